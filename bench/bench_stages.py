"""The staged layer forward against one full forward pass per true-sequential group (the calibrator before it).

GPTQ (w4 g128 asymmetric, fp32) of a model in memory with quantkit.run.calibrator.quantize_calibrated, on the same
calibration windows, two ways in the same process, alternating: staged (quantkit/run/stages.py: each group's inputs
computed once, the attention once a layer) and full (LayerCalibrator.staged = False: a forward pass of the
whole layer per group, then one for the outputs, as before). Both give the same quantized weights bit for bit
(checked here too). Optionally one decoder layer of Llama-2-7B's shape with random weights (--llama7b-layer).

    python bench/bench_stages.py --model ../shared/models/tiny-llama2-mha --n-samples 128 --seq-len 256 --rounds 2
    python bench/bench_stages.py --llama7b-layer --n-samples 16 --seq-len 2048 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

import quantkit
from quantkit.backends.gptq import GPTQConfig
from quantkit.model import LlamaForCausalLM, preset
from quantkit.run.calibrator import LayerCalibrator, quantize_calibrated


@contextlib.contextmanager
def full_passes():
    LayerCalibrator.staged = False
    try:
        yield
    finally:
        LayerCalibrator.staged = True


def llama7b_layer() -> LlamaForCausalLM:
    config = preset("llama2-7b")
    config.num_hidden_layers, config.vocab_size, config.torch_dtype = 1, 32000, "float32"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if "proj" in name or "lm_head" in name or "embed" in name else p.fill_(1.0)
    return model.eval()


def run(args, tokens, staged: bool) -> tuple[float, dict]:
    model = llama7b_layer() if args.llama7b_layer else quantkit.load(args.model, dtype="fp32")
    config = GPTQConfig(bits=4, group_size=128, desc_act=args.act_order)
    with contextlib.nullcontext() if staged else full_passes():
        start = time.perf_counter()
        quantize_calibrated(model, config, tokens, batch_size=args.batch_size, progress=False)
        seconds = time.perf_counter() - start
    return seconds, model.state_dict()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/models/tiny-llama2-mha")
    p.add_argument("--llama7b-layer", action="store_true", help="one random layer of Llama-2-7B's shape instead")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    vocab = 32000 if args.llama7b_layer else quantkit.load_tokenizer(args.model).vocab_size
    tokens = torch.randint(0, vocab, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    times = {"staged": [], "full": []}
    for _ in range(args.rounds):
        for name in ("full", "staged"):
            seconds, state = run(args, tokens, name == "staged")
            times[name].append(seconds)
            if name == "full":
                reference = state
            else:
                assert all(torch.equal(state[k], reference[k]) for k in state), "staged and full passes differ"
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({"model": "llama2-7b layer (random)" if args.llama7b_layer else args.model,
                      "tokens": [args.n_samples, args.seq_len], "batch_size": args.batch_size,
                      "act_order": args.act_order, "threads": torch.get_num_threads(), "load": os.getloadavg()[0],
                      "seconds": times, "best_full_s": round(best["full"], 2), "best_staged_s": round(best["staged"], 2),
                      "speedup": round(best["full"] / best["staged"], 2),
                      "median_ratio": round(statistics.median(times["full"]) / statistics.median(times["staged"]), 2),
                      "identical_weights": True}))


if __name__ == "__main__":
    main()
