# Quickstart targets. Both create .venv when missing and install torch==2.13.0 (a CPU wheel) before
# the project, because an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo/model
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

QK := $(VENV)/bin/quantkit
EVAL := --dataset $(DEMO)/test.txt --seq-len 256 --dtype fp32 --batch-size 8
CALIB := --calib $(DEMO)/train.txt --n-samples 64 --seq-len 256

# Generate, quantize four ways, generate again, then one table (and out/demo-report.html) comparing them.
demo: $(STAMP)
	$(QK) generate $(DEMO) "The list type" --max-new-tokens 40
	$(QK) quantize $(DEMO) --method int4 --group-size 128 -o out/demo-int4 --force
	$(QK) quantize $(DEMO) --method bnb-nf4 -o out/demo-nf4 --force
	$(QK) quantize $(DEMO) --method rtn --bits 4 --group-size 128 --sym -o out/demo-rtn --force
	$(QK) quantize $(DEMO) --method gptq --bits 4 --group-size 128 $(CALIB) -o out/demo-gptq --force
	$(QK) generate out/demo-int4 "The list type" --max-new-tokens 40
	$(QK) compare $(DEMO) out/demo-int4 out/demo-nf4 out/demo-rtn out/demo-gptq $(EVAL) --tp auto --tp-windows 16 \
		--report out/demo-report.html --report out/demo-report.json

test: $(STAMP)
	$(PY) -m pytest -q

# For iteration: everything but the tests marked slow (make test and CI run them all).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache out
