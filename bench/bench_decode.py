"""Decode speed on CPU of a model with Llama-2-7B-sized layers (2 of them, random weights).

fp16 against int4 (tinygemm CPU kernel), bnb-nf4 and bnb-int8, greedy decoding with the KV cache.
The embedding and lm_head (32000 x 4096) stay fp16 in every variant, as in a real quantized model.
Usage: python bench/bench_decode.py [--layers 2] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from quantkit.backends import BACKENDS, QuantConfig, quantize
from quantkit.model import LlamaForCausalLM, SamplingConfig, generate, preset

VARIANTS = {"fp16": None, "int4 g128": {"method": "int4", "group_size": 128},
            "bnb-nf4": {"method": "bnb-nf4"}, "bnb-int8": {"method": "bnb-int8"}}


def random_model(layers: int) -> LlamaForCausalLM:
    config = preset("llama2-7b")
    config.num_hidden_layers = layers
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").half().eval().requires_grad_(False)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model


def tokens_per_second(model, prompt_len: int, new_tokens: int) -> float:
    prompt = [list(range(3, 3 + prompt_len))]
    generate(model, prompt, SamplingConfig(max_new_tokens=2))  # warm up (int4 packs its kernel layout here)
    start = time.perf_counter()
    generate(model, prompt, SamplingConfig(max_new_tokens=new_tokens))
    return new_tokens / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = random_model(args.layers)
    print(f"{args.layers} layers of Llama-2-7B shape, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    print("| variant | tokens/s | vs fp16 |")
    print("|---|---|---|")
    fp16 = None
    for name, spec in VARIANTS.items():
        if spec is not None and BACKENDS.get(spec["method"]).unusable_reason():
            print(f"| {name} | not usable: {BACKENDS.get(spec['method']).unusable_reason()} | |")
            continue
        model = base if spec is None else quantize(copy.deepcopy(base), QuantConfig.from_dict(spec))
        tps = tokens_per_second(model, args.prompt, args.new_tokens)
        fp16 = fp16 or tps
        print(f"| {name} | {tps:.2f} | {tps / fp16:.2f}x |")
        del model


if __name__ == "__main__":
    main()
