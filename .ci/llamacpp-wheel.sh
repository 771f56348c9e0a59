#!/usr/bin/env bash
# Builds (once, cached by the hash of this script) the wheel of llama-cpp-python 0.3.36, the llama.cpp runtime that
# `quantkit check`, `eval` and `compare` run .gguf files in (tests/eval/test_llamacpp.py); prints its path (last line).
# pip compiles llama.cpp from the source distribution: about 4 minutes on 2 cores. The build is portable x86-64 with
# AVX2 (GGML_NATIVE=OFF): a native build turns on AMX kernels, which crash on machines that report AMX but do not
# grant it (seen here: a segfault in the first Q4_0 matmul).
#   usage: .ci/llamacpp-wheel.sh            cache: $QUANTKIT_RUNTIME_CACHE (default ~/.cache/quantkit-runtimes)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
key=$(sha256sum "$here/llamacpp-wheel.sh" | cut -c1-12)
cache=${QUANTKIT_RUNTIME_CACHE:-$HOME/.cache/quantkit-runtimes}/llamacpp-$key
if [ ! -f "$cache/.complete" ]; then
    rm -rf "$cache"
    mkdir -p "$cache"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
        python3 -m pip wheel -q --no-deps --no-cache-dir -w "$cache" llama-cpp-python==0.3.36 >&2
    touch "$cache/.complete"
fi
ls "$cache"/llama_cpp_python-0.3.36-*.whl | tail -n 1
