"""Peak RSS of `quantkit quantize` on checkpoints of 4 and 16 layers of the same width.

The streaming pipeline holds one decoder layer at a time, so the peak must not grow with depth:
the 16/4 ratio should stay under 1.2. Each run is a fresh subprocess; its peak RSS comes from
getrusage(RUSAGE_CHILDREN). Usage: python bench/bench_rss.py [--hidden 2048] [--method int4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from quantkit.model import LlamaConfig, LlamaForCausalLM, save_model


def make_checkpoint(path: Path, layers: int, hidden: int, tokenizer_dir: Path | None = None):
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 128 * 128,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, torch_dtype="float16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").half()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    save_model(model, path, tokenizer_dir=tokenizer_dir, max_shard_size="1GB")
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def peak_rss_of(cmd: list[str]) -> int:
    """Peak RSS in bytes of a command run in its own helper process (so children's maxima don't mix)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    return int(out.stdout.strip()) * 1024  # ru_maxrss is in KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--method", default="int4")
    parser.add_argument("--extra", nargs="*", default=["--group-size", "128"], help="method flags")
    args = parser.parse_args()
    quantkit_cli = [sys.executable, "-m", "quantkit.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in (4, 16):
            src = Path(tmp) / f"src{layers}"
            size = make_checkpoint(src, layers, args.hidden)
            cmd = [*quantkit_cli, "quantize", str(src), "--method", args.method, *args.extra, "-o", str(Path(tmp) / f"q{layers}")]
            rows.append((layers, size, peak_rss_of(cmd)))
    print(f"method {args.method} {' '.join(args.extra)}, hidden {args.hidden}")
    print("| layers | checkpoint MB | peak RSS MB |")
    print("|---|---|---|")
    for layers, size, rss in rows:
        print(f"| {layers} | {size / 1e6:.0f} | {rss / 1e6:.0f} |")
    print(f"ratio 16/4 layers: {rows[1][2] / rows[0][2]:.3f} (checkpoints {rows[1][1] / rows[0][1]:.1f}x larger)")


if __name__ == "__main__":
    main()
