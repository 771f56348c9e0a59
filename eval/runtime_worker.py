"""One runtime's logits for `quantkit check`: a standalone script, run as `python -I runtime_worker.py ...` by the
interpreter that holds the runtime (GPTQModel lives in its own virtualenv), so it imports nothing of quantkit.

    python -I runtime_worker.py RUNTIME MODEL_DIR|MODEL.gguf TOKENS OUT DTYPE [TEXT]

RUNTIME: `transformers` (transformers' own loader: compressed-tensors, bitsandbytes and, through optimum and
gptqmodel, GPTQ), `gptqmodel` (`GPTQModel.load`) or `llama.cpp` (llama-cpp-python on a .gguf, in its own
precision; with TEXT, a UTF-8 file, the result's `tokens` are llama.cpp's tokenization of it, BOS first).
TOKENS: a safetensors file with `ids` int64 (W, T); OUT: where the fp32 logits (W, T, vocab) go, as safetensors
`logits`. The last line of stdout is one JSON object: what the runtime applied (its version, the class of each
decoder linear (llama.cpp: its ggml type), how many keep an act-order g_idx, the lm_head's class, the dtype), or
`{"missing": PACKAGE}` (exit 4) or `{"error": MESSAGE}` (exit 3) with the runtime's own words.
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


GGUF_LINEAR = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")


def run_llama_cpp(path: str, ids, text: str | None):
    """llama.cpp's fp32 logits (W, T, vocab) of each window (a fresh context each), and what it applied: its
    version, the ggml type of each decoder linear (gguf's reader), llama.cpp's tokenization of `text` (with BOS)."""
    import os

    import gguf
    import llama_cpp
    import numpy as np

    t = ids.shape[1]
    llm = llama_cpp.Llama(model_path=path, n_ctx=t, n_batch=t, n_ubatch=t, logits_all=True, verbose=False,
                          n_threads=os.cpu_count() or 1)
    logits = []
    for row in ids.tolist():
        llm.reset()
        llm.eval(row)
        logits.append(np.array(llm.scores[:t], dtype=np.float32))
    types = {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}
    classes = Counter(kind for name, kind in types.items() if GGUF_LINEAR.match(name))
    result = {"version": f"llama-cpp-python {llama_cpp.__version__}", "dtype": "float32", "kernels": dict(classes),
              "linears": sum(classes.values()),
              "quantized": sum(n for kind, n in classes.items() if kind not in ("F32", "F16", "BF16")),
              "act_order_modules": 0, "lm_head": types.get("output.weight", types.get("token_embd.weight"))}
    if text is not None:
        result["tokens"] = llm.tokenize(text.encode(), add_bos=True, special=False)
    llm.close()  # now, not in __del__ at exit (where llama-cpp-python 0.3's cleanup raises)
    return np.stack(logits), result


def main(runtime: str, path: str, tokens: str, out: str, dtype_name: str, text_file: str | None = None):
    try:
        import torch
        from safetensors.torch import load_file, save_file
    except ImportError as e:
        emit({"missing": e.name or "torch"}, 4)
    if runtime == "llama.cpp":
        text = open(text_file, encoding="utf-8").read() if text_file else None
        try:
            logits, result = run_llama_cpp(path, load_file(tokens)["ids"], text)
        except ImportError as e:
            emit({"missing": e.name or "llama_cpp"}, 4)
        except Exception as e:  # llama.cpp refused the file (ValueError: "Failed to load model from file")
            emit({"error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}, 3)
        save_file({"logits": torch.from_numpy(logits)}, out)
        emit(result)
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
    if len(sys.argv) not in (6, 7):
        sys.exit("usage: python -I runtime_worker.py RUNTIME MODEL_DIR|MODEL.gguf TOKENS OUT DTYPE [TEXT]")
    main(*sys.argv[1:])
