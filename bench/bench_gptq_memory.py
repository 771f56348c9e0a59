"""Peak RSS of a GPTQ `quantkit quantize` on checkpoints of 4 and 16 layers of the same width.

GPTQ adds calibration state to the streaming pipeline: the activations (n, T, hidden), one
sub-group's Hessians (at most in_features^2 fp32 each) and fp32 working copies of the layer's
weights. None of it grows with depth, so the 16/4 ratio should stay under 1.2, as for the
uncalibrated methods (bench/bench_rss.py, whose checkpoints and RSS probe this reuses). Calibration
comes from a saved .pt LongTensor of random token ids through the CLI's --calib (the CLI still
opens the checkpoint's tokenizer.model for a token file, so demo/model's, vocab 4096 as the random
checkpoints, is copied in). Each run is a fresh subprocess; its peak RSS comes from
getrusage(RUSAGE_CHILDREN). Usage:

    python bench/bench_gptq_memory.py [--hidden 2048] [--n-samples 16] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_rss import make_checkpoint, peak_rss_of

TOKENIZER = Path(__file__).resolve().parent.parent / "demo" / "model" / "tokenizer.model"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--extra", nargs="*", default=["--bits", "4", "--group-size", "128"], help="gptq flags")
    args = parser.parse_args()
    quantkit_cli = [sys.executable, "-m", "quantkit.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "tokens.pt"
        ids = torch.randint(0, 4096, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(0))
        torch.save(ids, calib)  # vocab 4096, as make_checkpoint's
        for layers in (4, 16):
            src = Path(tmp) / f"src{layers}"
            size = make_checkpoint(src, layers, args.hidden)
            shutil.copy(TOKENIZER, src / "tokenizer.model")
            cmd = [*quantkit_cli, "quantize", str(src), "--method", "gptq", *args.extra, "--calib", str(calib),
                   "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len), "-o", str(Path(tmp) / f"q{layers}")]
            start = time.perf_counter()
            rss = peak_rss_of(cmd)
            rows.append((layers, size, rss, time.perf_counter() - start))
            print(f"  done {layers} layers: {rss / 1e6:.0f} MB, {rows[-1][3]:.0f} s", flush=True)
    print(f"\ngptq {' '.join(args.extra)}, hidden {args.hidden}, calibration {args.n_samples} x {args.seq_len} tokens (.pt)")
    print("| layers | checkpoint MB | peak RSS MB | seconds |")
    print("|---|---|---|---|")
    for layers, size, rss, seconds in rows:
        print(f"| {layers} | {size / 1e6:.0f} | {rss / 1e6:.0f} | {seconds:.0f} |")
    print(f"ratio 16/4 layers: {rows[1][2] / rows[0][2]:.3f} (checkpoints {rows[1][1] / rows[0][1]:.1f}x larger)")


if __name__ == "__main__":
    main()
