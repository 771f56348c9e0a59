"""quantkit's calibrated GGUF files against llama.cpp's own quantizer, all run by llama.cpp (issue 27).

For MODEL (a Llama 2 directory, fp16):
  - F16: quantkit.formats.gguf.write_gguf of the fp16 model (the base llama.cpp quantizes from);
  - llama.cpp Q4_0 and Q4_K_M: llama.cpp's own quantizer (llama_cpp.llama_model_quantize) from that F16 GGUF, as it
    comes (the embedding and output quantized too) and with both kept in F16, as quantkit keeps them;
  - quantkit RTN / GPTQ / AWQ / AWQ+GPTQ at 4 bits, group 32, symmetric: `quantkit quantize ... --format gguf` (Q4_0),
    calibrated on --calib (the same windows for each);
then one `quantkit compare MODEL *.gguf` on --dataset (every .gguf run by llama-cpp-python), printed as a table:
bits per weight (decoder linears), file size, mean KL and top-1 against the fp16 base (quantkit's fp32 model of it),
perplexity.

    python bench/bench_gguf_compare.py ../shared/models/tiny-llama2-mha [--seq-len 256 --n-samples 128]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import quantkit
from quantkit.eval.llamacpp import import_llama_cpp
from quantkit.formats.gguf import write_gguf

CALIBRATED = {  # name -> quantize flags (all Q4_0)
    "quantkit rtn": ("--method", "rtn"),
    "quantkit gptq": ("--method", "gptq"),
    "quantkit awq": ("--method", "awq"),
    "quantkit awq+gptq": ("--method", "gptq", "--awq"),
}


def llama_cpp_quantize(src: Path, dst: Path, kind: str, f16_embeddings: bool = False) -> Path:
    """llama.cpp's quantizer (llama_model_quantize, its `llama-quantize`), from the F16 GGUF, at `kind`; by default it
    quantizes the embedding (as `kind`) and the output (Q6_K) too, f16_embeddings keeps both in F16 as quantkit does
    (llama-quantize's --token-embedding-type f16 --output-tensor-type f16)."""
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = 2
    if f16_embeddings:
        params.token_embedding_type = params.output_tensor_type = llama_cpp.GGML_TYPE_F16
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama.cpp's quantizer failed on {src} -> {kind}")
    return dst


def quantkit_cli(*args) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stdout + done.stderr)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--calib", help="calibration text [default: MODEL/train.txt]")
    parser.add_argument("--dataset", help="evaluation text [default: MODEL/test.txt]")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--report", help="also write compare's JSON report here")
    a = parser.parse_args()
    model = Path(a.model)
    calib, dataset = a.calib or model / "train.txt", a.dataset or model / "test.txt"
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        tmp = Path(tmp)
        f16 = write_gguf(quantkit.load(model, dtype="fp16"), tmp / "f16.gguf", model)
        files, seconds = {"F16": f16}, {}
        for kind in ("Q4_0", "Q4_K_M"):
            for f16_embeddings in (False, True):
                name = f"llama.cpp {kind}{', F16 embeddings' if f16_embeddings else ''}"
                start = time.perf_counter()
                files[name] = llama_cpp_quantize(f16, tmp / f"llama-cpp-{kind}-{f16_embeddings}.gguf", kind,
                                                 f16_embeddings)
                seconds[name] = time.perf_counter() - start
        for name, flags in CALIBRATED.items():
            out = tmp / (name.replace(" ", "-").replace("+", "-") + ".gguf")
            calibration = () if "rtn" in flags else ("--calib", calib, "--n-samples", a.n_samples, "--seq-len",
                                                     a.seq_len)
            seconds[name] = quantkit_cli("quantize", model, *flags, "--bits", 4, "--group-size", 32, "--sym",
                                         *calibration, "--format", "gguf", "-o", out)
            files[name] = out
        report_path = Path(a.report) if a.report else tmp / "report.json"
        quantkit_cli("compare", model, *files.values(), "--dataset", dataset, "--seq-len", a.seq_len, "--dtype", "fp32",
                     "--report", report_path)
        report = json.loads(report_path.read_text())
    print(f"{model}: {dataset} in windows of {a.seq_len}; base: quantkit's fp32 model of the fp16 checkpoint; every "
          f"row run by llama.cpp (llama-cpp-python)")
    print("| file | made by | bits/weight | size (MB) | mean KL | top-1 (%) | perplexity | quantize (s) |")
    print("| :-- | :-- | --: | --: | --: | --: | --: | --: |")
    for (name, _), entry in zip(files.items(), report["models"]):
        f = entry["fidelity"]
        print(f"| {name} | {entry['method']} | {entry['bits_per_weight']:.2f} | {entry['size_bytes'] / 1e6:.2f} | "
              f"{f['kl']['mean']:.3e} | {100 * f['top1']['agreement']:.2f} | {entry['perplexity']['ppl']:.3f} | "
              f"{seconds.get(name, 0):.1f} |")
    base = report["base"]
    print(f"base perplexity (quantkit fp32): {base['perplexity']['ppl']:.3f}")


if __name__ == "__main__":
    main()
