"""GPTQ vs round-to-nearest on a real (small) trained model: mean KL(fp16 || quantized) and perplexity.

Calibration: 128 windows of 256 tokens sampled with seed 0 from the model's train.txt by
`calibrate.calibration_tokens` (GPTQ's protocol: one BOS, the joined text, random distinct offsets).
Each method is `quantize_checkpoint`-ed in fp32 to the gptq format (asymmetric), reloaded with
`quantkit.load(out, dtype="fp32")` and scored over test.txt in windows of 256 tokens
(`eval.token_windows`, the GPTQ perplexity protocol) against the fp16 checkpoint upcast to fp32,
exactly as bench/bench_quality.py scores (its `score`). 4-bit modules are scored dequantized with an
fp32 matmul (their int4 kernels, which compute in bf16, switched off) so that the table measures
weight error only; the last column repeats the 4-bit KL with the kernels on, as `quantkit eval` runs.
Usage:

    python bench/bench_gptq_quality.py ../shared/models/tiny-llama2-mha
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


import quantkit
from bench_quality import score
from quantkit.calibrate import calibration_tokens
from quantkit.eval import token_windows
from quantkit.backends import QuantConfig
from quantkit.run.export import ExportOptions
from quantkit.run.calibrator import CalibrationOptions
from quantkit.quant.linear import AffineLinear

METHODS = {
    "RTN w4 g128": {"method": "rtn", "bits": 4, "group_size": 128},
    "GPTQ w4 g128": {"method": "gptq", "bits": 4, "group_size": 128},
    "GPTQ w4 g128 act-order": {"method": "gptq", "bits": 4, "group_size": 128, "desc_act": True},
    "RTN w3 g128": {"method": "rtn", "bits": 3, "group_size": 128},
    "GPTQ w3 g128": {"method": "gptq", "bits": 3, "group_size": 128},
    "GPTQ w3 g128 act-order": {"method": "gptq", "bits": 3, "group_size": 128, "desc_act": True},
    "RTN w2 g64": {"method": "rtn", "bits": 2, "group_size": 64},
    "GPTQ w2 g64": {"method": "gptq", "bits": 2, "group_size": 64},
}


def set_int4_kernels(model, on: bool) -> int:
    """Switch the int4 kernels of every 4-bit AffineLinear on or off; returns how many modules could use them."""
    n = 0
    for m in model.modules():
        if isinstance(m, AffineLinear) and m._int4_kernel_fits():
            m.use_int4_kernel = on
            n += 1
    return n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--train", help="calibration text [MODEL/train.txt]")
    parser.add_argument("--text", help="evaluation text [MODEL/test.txt]")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=256, help="evaluation window")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help=f"subset of: {', '.join(METHODS)}")
    args = parser.parse_args()
    model_dir = Path(args.model)
    train = Path(args.train or model_dir / "train.txt")
    text = Path(args.text or model_dir / "test.txt")
    tok = quantkit.load_tokenizer(model_dir)
    tokens = calibration_tokens(str(train), tok, n_samples=args.n_samples, seq_len=args.calib_seq_len, seed=args.seed)
    windows = token_windows(tok, text.read_text(), args.seq_len)
    base = quantkit.load(model_dir, dtype="fp32")
    base_ppl, _ = score(base, None, windows, args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            out = Path(tmp) / name.replace(" ", "_")
            start = time.perf_counter()
            summary = quantkit.quantize_checkpoint(model_dir, QuantConfig.from_dict(METHODS[name]), out,
                                                   ExportOptions(format="gptq", dtype="fp32"), progress=False,
                                                   calibration=CalibrationOptions(tokens, n_samples=args.n_samples,
                                                                                  seq_len=args.calib_seq_len,
                                                                                  seed=args.seed))
            seconds = time.perf_counter() - start
            model = quantkit.load(out, dtype="fp32")
            kernels = set_int4_kernels(model, False)
            ppl, kl = score(model, base, windows, args.batch_size)
            kl_kernels = None
            if kernels:
                set_int4_kernels(model, True)
                kl_kernels = score(model, base, windows, args.batch_size)[1]
            errs = [e["relative_error"] for e in summary.errors if e["relative_error"] is not None]
            rows.append((name, summary.bits_per_weight, ppl, kl, kl_kernels,
                         sum(errs) / len(errs) if errs else None, seconds))
            print(f"  done {name}: ppl {ppl:.3f}, KL {kl:.5f} ({seconds:.0f} s)", flush=True)

    print(f"\n{args.model}: calibration {tokens.shape[0]} x {tokens.shape[1]} tokens of {train.name}, seed {args.seed} "
          f"(calibrate.calibration_tokens); scored over {text.name} in {windows.shape[0]} windows of {args.seq_len}, fp32")
    print("\n| method | bits/weight | ppl | mean KL vs fp16 | KL / RTN (same width) | "
          "mean rel. output error (calibration) | quantize s | KL with int4 kernels (bf16) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| fp16 | 16 | {base_ppl:.3f} | 0 | - | - | - | - |")
    kl_of = {name: kl for name, _, _, kl, *_ in rows}
    for name, bpw, ppl, kl, kl_k, err, seconds in rows:
        width = name.split()[1] + " " + name.split()[2]
        rtn = kl_of.get(f"RTN {width}")
        ratio = f"{kl / rtn:.3f}" if rtn and not name.startswith("RTN") else "-"
        print(f"| {name} | {bpw:.2f} | {ppl:.3f} | {kl:.5f} | {ratio} | {'-' if err is None else f'{err:.4f}'} | "
              f"{seconds:.1f} | {'-' if kl_k is None else f'{kl_k:.5f}'} |")
    print()
    for width in ("w4 g128", "w3 g128", "w2 g64"):
        rtn = kl_of.get(f"RTN {width}")
        gptq = {n: kl for n, kl in kl_of.items() if n.startswith(f"GPTQ {width}")}
        if rtn is None or not gptq:
            continue
        best = min(gptq.values())
        verdict = "below" if all(kl < rtn for kl in gptq.values()) else "NOT below"
        print(f"{width}: every GPTQ variant {verdict} RTN's KL; best GPTQ / RTN = {best / rtn:.3f}"
              + (f" (target at 3 bits: <= 0.667: {'met' if best / rtn <= 2 / 3 else 'NOT met'})" if width == "w3 g128" else ""))


if __name__ == "__main__":
    main()
