"""One runtime's logits for `quantkit check`: a standalone script, run as `python -I runtime_worker.py ...` by the
interpreter that holds the runtime (GPTQModel lives in its own virtualenv), so it imports nothing of quantkit.

    python -I runtime_worker.py RUNTIME MODEL_DIR TOKENS OUT DTYPE

RUNTIME: `transformers` (transformers' own loader: compressed-tensors, bitsandbytes and, through optimum and
gptqmodel, GPTQ) or `gptqmodel` (`GPTQModel.load`). TOKENS: a safetensors file with `ids` int64 (W, T); OUT: where
the fp32 logits (W, T, vocab) go, as safetensors `logits`. The last line of stdout is one JSON object: what the
runtime applied (its version, the class of each decoder linear, how many keep an act-order g_idx, the lm_head's
class, the dtype), or `{"missing": PACKAGE}` (exit 4) or `{"error": MESSAGE}` (exit 3) with the runtime's own words.
"""

import json
import re
import sys
from collections import Counter

DECODER_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj$")


def emit(obj, code: int = 0):
    print(json.dumps(obj), flush=True)
    sys.exit(code)


def load_transformers(path: str, dtype):
    import transformers

    config = json.load(open(f"{path}/config.json"))
    qc = config.get("quantization_config") or {}
    kwargs = {}
    if qc.get("quant_method") == "compressed-tensors":
        groups = (qc.get("config_groups") or {}).values()
        if any((g.get("weights") or {}).get("symmetric") is False for g in groups):
            # compressed-tensors 0.20 builds transformers' empty model with an unpacked zero point: asymmetric
            # pack-quantized files load only dequantized (llm-compressor#1618)
            kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **kwargs)
    return model.eval(), f"transformers {transformers.__version__}"


def load_gptqmodel(path: str, dtype):
    import gptqmodel
    from gptqmodel import GPTQModel

    wrapper = GPTQModel.load(path, device="cpu", dtype=dtype)
    return wrapper.model.eval(), f"gptqmodel {gptqmodel.__version__}"


def act_order_modules(model) -> int:
    """Decoder linears that keep a g_idx other than column // group_size (act-order honoured)."""
    import torch

    count = 0
    for name, module in model.named_modules():
        g_idx, group_size = getattr(module, "g_idx", None), getattr(module, "group_size", None)
        if DECODER_LINEAR.match(name) and isinstance(g_idx, torch.Tensor) and isinstance(group_size, int):
            k = g_idx.numel()
            trivial = torch.arange(k, device=g_idx.device) // (group_size if group_size > 0 else k)
            count += not torch.equal(g_idx.long(), trivial)
    return count


def applied(model, version: str, dtype) -> dict:
    classes = Counter(type(m).__name__ for name, m in model.named_modules() if DECODER_LINEAR.match(name))
    return {"version": version, "dtype": str(dtype).removeprefix("torch."), "kernels": dict(classes),
            "linears": sum(classes.values()),
            "quantized": sum(n for cls, n in classes.items() if cls != "Linear"),  # a dense torch Linear: dequantized
            "act_order_modules": act_order_modules(model),
            "lm_head": type(model.get_output_embeddings()).__name__}


def main(runtime: str, path: str, tokens: str, out: str, dtype_name: str):
    try:
        import torch
        from safetensors.torch import load_file, save_file
    except ImportError as e:
        emit({"missing": e.name or "torch"}, 4)
    dtype = getattr(torch, dtype_name)
    loader = {"transformers": load_transformers, "gptqmodel": load_gptqmodel}[runtime]
    try:
        model, version = loader(path, dtype)
    except ImportError as e:
        emit({"missing": e.name or runtime}, 4)
    except Exception as e:  # the runtime refused the file: its own words, for the report
        emit({"error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}, 3)
    ids = load_file(tokens)["ids"]
    try:
        with torch.no_grad():
            logits = torch.stack([model(row[None]).logits[0].float() for row in ids])
    except Exception as e:
        emit({"error": f"forward failed: {type(e).__name__}: {e}".splitlines()[0][:500]}, 3)
    save_file({"logits": logits.contiguous()}, out)
    emit(applied(model, version, dtype))


if __name__ == "__main__":
    if len(sys.argv) != 6:
        sys.exit("usage: python -I runtime_worker.py RUNTIME MODEL_DIR TOKENS OUT DTYPE")
    main(*sys.argv[1:])
