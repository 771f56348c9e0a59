# Quickstart targets. Both create .venv when missing and install torch==2.13.0 (a CPU wheel) before
# the project, because an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo/model
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

QK := $(VENV)/bin/quantkit
EVAL := --dataset $(DEMO)/test.txt --seq-len 256 --dtype fp32 --batch-size 8

demo: $(STAMP)
	$(QK) generate $(DEMO) "The list type" --max-new-tokens 40
	$(QK) quantize $(DEMO) --method int4 --group-size 128 -o out/demo-int4 --force
	$(QK) generate out/demo-int4 "The list type" --max-new-tokens 40
	$(QK) eval $(DEMO) $(EVAL)
	$(QK) eval out/demo-int4 $(EVAL)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache out
