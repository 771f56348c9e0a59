#!/usr/bin/env bash
# Builds (once, cached by the hash of this script and its requirements) a virtualenv holding GPTQModel 7.7.0 on the
# CPU build of torch 2.13.0, for `quantkit check` and the GPTQ runtime tests; prints its python's path (last line).
# GPTQModel is never a dependency of quantkit: it lives here, beside the project's own venv.
#   usage: .ci/gptqmodel-venv.sh            cache: $QUANTKIT_RUNTIME_CACHE (default ~/.cache/quantkit-runtimes)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
key=$(cat "$here/gptqmodel-venv.sh" "$here/gptqmodel-requirements.txt" | sha256sum | cut -c1-12)
venv=${QUANTKIT_RUNTIME_CACHE:-$HOME/.cache/quantkit-runtimes}/gptqmodel-$key
if [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.13.0 >&2
    echo "torch==2.13.0" > "$venv/constraints.txt"
    "$venv/bin/pip" install -q -c "$venv/constraints.txt" -r "$here/gptqmodel-requirements.txt" >&2
    "$venv/bin/pip" install -q -c "$venv/constraints.txt" --no-deps gptqmodel==7.7.0 >&2
    "$venv/bin/python" -c "import gptqmodel, optimum, transformers" >&2
    touch "$venv/.complete"
fi
echo "$venv/bin/python"
