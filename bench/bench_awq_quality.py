"""Quality of the calibrated methods on a trained model: RTN, GPTQ, GPTQ act-order, AWQ, AWQ+GPTQ, AWQ+GPTQ act-order.

Each method quantizes the model with `quantkit quantize` (a fresh process; calibration: --calib train.txt, 128 windows of
256 tokens, seed 0, the same for all), at --bits 4 and 3, group 128, asymmetric, written as gptq; then one
`quantkit compare` scores every output against the base over test.txt (non-overlapping 256-token windows, fp32): mean
KL per token, top-1 agreement, perplexity. Seconds: the quantize command's own wall time (`seconds` of --json).

    python bench/bench_awq_quality.py ../shared/models/tiny-llama2-mha [--bits 4,3] [--calib CALIB.pt --llmc]

--calib CALIB.pt: the calibration tokens (n, seq) saved by ../shared/bench/ref_gptq.py --save-calib, for every method;
--llmc adds llm-compressor's AWQ (its AWQModifier, then round to nearest: bench/peers/llmc_awq.py, run with the
llm-compressor venv of ../shared/bench/peers-venv.sh under $PEERS, default /tmp/peers) on those same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEERS = Path(os.environ.get("PEERS", "/tmp/peers"))
LLMC_AWQ = Path(__file__).parent / "peers" / "llmc_awq.py"

METHODS = {"RTN": ["--method", "rtn"],
           "GPTQ": ["--method", "gptq"],
           "GPTQ act-order": ["--method", "gptq", "--act-order"],
           "AWQ": ["--method", "awq"],
           "AWQ+GPTQ": ["--method", "gptq", "--awq"],
           "AWQ+GPTQ act-order": ["--method", "gptq", "--awq", "--act-order"]}


def quantkit(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "quantkit", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def llmc_awq(args, bits: str, out: Path) -> float:
    """llm-compressor's AWQ at `bits` on the --calib tokens into out; its wall time (the process, load included)."""
    start = time.perf_counter()
    subprocess.run([str(PEERS / "llmc/bin/python"), str(LLMC_AWQ), args.model, args.calib, str(out), "--bits", bits,
                    "--group-size", args.group_size], check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--bits", default="4,3")
    p.add_argument("--group-size", default="128")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--calib", help="calibration tokens (n, seq) as a .pt file (default: 128 x 256 from train.txt)")
    p.add_argument("--llmc", action="store_true", help="add llm-compressor's AWQ on the --calib tokens")
    args = p.parse_args()
    if args.llmc and not args.calib:
        p.error("--llmc needs --calib CALIB.pt: llm-compressor gets the same tokens as quantkit")
    model = Path(args.model)
    calib = (["--calib", args.calib, "--seq-len", "256"] if args.calib else
             ["--calib", str(model / "train.txt"), "--n-samples", "128", "--seq-len", "256", "--seed", "0"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {}
        for bits in args.bits.split(","):
            for name in args.methods.split(","):
                out = Path(tmp) / f"{name.replace(' ', '_').replace('+', '-')}-w{bits}"
                flags = METHODS[name] + ["--bits", bits, "--group-size", args.group_size, "--format", "gptq"]
                summary = quantkit("quantize", str(model), *flags, *([] if name == "RTN" else calib), "-o", str(out),
                                   "--json")
                outputs[out.name] = (name, bits, summary["seconds"])
                print(name, bits, round(summary["seconds"], 1), "s", flush=True)
            if args.llmc:
                out = Path(tmp) / f"llmc-awq-w{bits}"
                outputs[out.name] = ("llm-compressor AWQ", bits, llmc_awq(args, bits, out))
        report = quantkit("compare", str(model), *(str(Path(tmp) / n) for n in outputs), "--dataset",
                          str(model / "test.txt"), "--seq-len", "256", "--dtype", "fp32", "--batch-size", "8",
                          "--no-speed", "--json")
        for m in report["models"]:
            name, bits, seconds = outputs[Path(m["path"]).name]
            rows.append({"method": name, "bits": int(bits), "kl": m["fidelity"]["kl"]["mean"],
                         "kl_stderr": m["fidelity"]["kl"]["stderr"], "top1": m["fidelity"]["top1"]["agreement"],
                         "ppl": m["perplexity"]["ppl"], "seconds": round(seconds, 1)})
    print("| bits | method | mean KL vs fp16 | top-1 (%) | ppl | quantize s |")
    print("| --: | --- | --: | --: | --: | --: |")
    for r in rows:
        print(f"| {r['bits']} | {r['method']} | {r['kl']:.3e} ± {r['kl_stderr']:.1e} | {100 * r['top1']:.2f} | "
              f"{r['ppl']:.3f} | {r['seconds']} |")
    print(json.dumps({"model": str(model), "load": os.getloadavg()[0], "rows": rows}))


if __name__ == "__main__":
    main()
