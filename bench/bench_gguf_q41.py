"""What GGUF's Q4_1 costs a 4-bit group-32 asymmetric model: its minimum m = -s z stored in fp16 (issue 27).

RTN w4 g32 asymmetric of MODEL in memory (fp16), written with quantkit.formats.gguf.write_gguf and read back with
read_gguf (gguf's own decoder); the mean KL (fp32 arithmetic) against the fp32 base over the first --windows
non-overlapping windows of test.txt, for quantkit's exact weights ((q - z) s) and for the GGUF's (d q + fp16(m)).

    python bench/bench_gguf_q41.py ../shared/models/tiny-llama2-mha [--windows 40 --seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import quantkit
from quantkit.backends.rtn import RTNConfig
from quantkit.formats.gguf import read_gguf, write_gguf
from quantkit.quant.linear import AffineLinear


def with_weights(base_dir: str, weights: dict[str, torch.Tensor]):
    model = quantkit.load(base_dir, dtype="fp32")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in weights:
                p.copy_(weights[name])
    return model


@torch.no_grad()
def mean_kl(base, model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for w in windows.split(4):
        p = F.log_softmax(base(w).float(), -1)
        q = F.log_softmax(model(w).float(), -1)
        total += float((p.exp() * (p - q)).sum())
        count += w.numel()
    return total / count


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    tokens = quantkit.load_tokenizer(a.model).encode((Path(a.model) / "test.txt").read_text(encoding="utf-8"))
    n = min(a.windows, len(tokens) // a.seq_len)
    windows = torch.tensor(tokens[: n * a.seq_len]).reshape(n, a.seq_len)
    quantized = quantkit.quantize(quantkit.load(a.model, dtype="fp16"), RTNConfig(bits=4, group_size=32,
                                                                              symmetric=False))
    exact = {}
    for name, m in quantized.named_modules():
        if isinstance(m, AffineLinear):
            w = m.affine_weight()
            g = w.group_index()
            exact[name + ".weight"] = (w.q.float() - w.zero.float()[:, g]) * w.scale.float()[:, g]
    with tempfile.TemporaryDirectory() as tmp:
        _, stored = read_gguf(write_gguf(quantized, Path(tmp) / "m.gguf", a.model))
    from_gguf = {n: stored[n] for n in exact}
    base = quantkit.load(a.model, dtype="fp32")
    kl_exact = mean_kl(base, with_weights(a.model, exact), windows)
    kl_gguf = mean_kl(base, with_weights(a.model, from_gguf), windows)
    largest = max(float((from_gguf[n] - exact[n]).abs().max()) for n in exact)
    print(json.dumps({"model": a.model, "windows": n, "seq_len": a.seq_len, "kl_exact": kl_exact, "kl_gguf_q4_1": kl_gguf,
                      "ratio": kl_gguf / kl_exact, "largest_weight_change": largest, "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
