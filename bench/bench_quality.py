"""Quality and interop of every method on a real (small) trained model.

For each method: `quantize_checkpoint` the model, reload it with quantkit AND with transformers,
compare their logits, and measure perplexity (GPTQ protocol) and mean KL(fp16 || quantized) per
token over the test text. Quality is scored in fp32 compute (the base is the fp16 checkpoint upcast). Usage:

    python bench/bench_quality.py ../shared/models/tiny-llama2-mha --text ../shared/models/tiny-llama2-mha/test.txt
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

import quantkit
from quantkit.eval import token_windows
from quantkit.backends import QuantConfig

METHODS = {
    "int4 g128": {"method": "int4", "group_size": 128},
    "rtn w4 g128 asym": {"method": "rtn", "bits": 4, "group_size": 128},
    "rtn w4 g128 sym": {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True},
    "rtn w3 g128": {"method": "rtn", "bits": 3, "group_size": 128},
    "rtn w8 per-channel": {"method": "rtn", "bits": 8, "group_size": -1},
    "bnb-int8": {"method": "bnb-int8"},
    "bnb-nf4": {"method": "bnb-nf4"},
    "bnb-fp4": {"method": "bnb-fp4"},
}


def transformers_load(path: Path, quantization_config: dict):
    kwargs = {}
    if quantization_config["quant_method"] == "compressed-tensors":
        asymmetric = any(not g["weights"]["symmetric"] for g in quantization_config["config_groups"].values())
        if asymmetric:  # upstream: transformers 5 cannot load packed zero points otherwise (llm-compressor#1618)
            kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, **kwargs).eval()


@torch.no_grad()
def score(model, base, windows: torch.Tensor, batch_size: int):
    """(perplexity, mean KL(base || model) per token) over the windows."""
    nll, kl, n = 0.0, 0.0, 0
    for batch in windows.split(batch_size):
        logp = F.log_softmax(model(batch)[:, :-1].float(), -1)
        base_logp = F.log_softmax(base(batch)[:, :-1].float(), -1) if base is not None else logp
        nll += F.nll_loss(logp.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        kl += (base_logp.exp() * (base_logp - logp)).sum().item()
        n += batch[:, 1:].numel()
    return math.exp(nll / n), kl / n


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--text", required=True)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help=f"subset of: {', '.join(METHODS)}")
    args = parser.parse_args()
    tok = quantkit.load_tokenizer(args.model)
    windows = token_windows(tok, Path(args.text).read_text(), args.seq_len)
    base = quantkit.load(args.model, dtype="fp32")
    ppl, _ = score(base, None, windows, args.batch_size)
    print(f"{args.model}, {windows.shape[0]} windows of {args.seq_len}, computed in fp32")
    print("| method | format | size MB | bits/weight | ppl | mean KL vs fp16 | max abs logit diff, quantkit vs transformers (fp16) |")
    print("|---|---|---|---|---|---|---|")
    size = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors")) / 1e6
    print(f"| fp16 | - | {size:.2f} | 16 | {ppl:.3f} | 0 | - |")
    probe = windows[:2]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            out = Path(tmp) / name.replace(" ", "_")
            summary = quantkit.quantize_checkpoint(args.model, QuantConfig.from_dict(METHODS[name]), out,
                                                   progress=False)
            # Interop in the checkpoint's dtype: with dtype=fp32, transformers' bnb loader keeps the
            # unquantized modules (norms, lm_head) in fp16 while quantkit honours fp32.
            theirs = transformers_load(out, ours_config(out))
            with torch.no_grad():
                diff = (quantkit.load(out, dtype="fp16")(probe).float() - theirs(probe).logits.float()).abs().max()
            ppl, kl = score(quantkit.load(out, dtype="fp32"), base, windows, args.batch_size)
            print(f"| {name} | {summary.format} | {summary.bytes_after / 1e6:.2f} | {summary.bits_per_weight:.2f} | "
                  f"{ppl:.3f} | {kl:.5f} | {diff.item():.2e} |")


def ours_config(out: Path) -> dict:
    import json

    return json.loads((out / "config.json").read_text())["quantization_config"]


if __name__ == "__main__":
    main()
