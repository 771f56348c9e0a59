"""llm-compressor's AWQ (AWQModifier, then its round-to-nearest QuantizationModifier) on a (n, seq) token tensor.

Run with llm-compressor's own Python (../shared/bench/peers-venv.sh llmc), never quantkit's:

    /tmp/peers/llmc/bin/python bench/peers/llmc_awq.py MODEL CALIB.pt OUT --bits 3 --group-size 128 [--sym]

AWQModifier with its defaults (Llama mappings, duo scaling, 20 grid points), fp32; the weights of every Linear but
lm_head then rounded to nearest, asymmetric unless --sym. Prints one line "RESULT {json}" with the wall time of oneshot
(load excluded) and of saving the compressed-tensors checkpoint. Without a GPU it turns off the cache's pin_memory
(llm-compressor 0.14 pins unconditionally: "Cannot access accelerator device when none is available").
"""
import argparse
import json
import pathlib
import shutil
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("calib")
ap.add_argument("out")
ap.add_argument("--bits", type=int, default=4)
ap.add_argument("--group-size", type=int, default=128)
ap.add_argument("--sym", action="store_true")
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)

from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from datasets import Dataset  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.quantization import QuantizationModifier  # noqa: E402
from llmcompressor.modifiers.transform.awq import AWQModifier  # noqa: E402
from llmcompressor.pipelines.cache import IntermediatesCache  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

if not torch.cuda.is_available():  # 0.14 pins the cached inputs unconditionally, which fails without an accelerator
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

calib = torch.load(a.calib)
ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=a.bits, type="int", strategy="group", group_size=a.group_size, symmetric=a.sym, dynamic=False))
recipe = [AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
t0 = time.perf_counter()
model = oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=calib.shape[1],
                num_calibration_samples=calib.shape[0], shuffle_calibration_samples=False, batch_size=1)
t1 = time.perf_counter()
model.save_pretrained(a.out, save_compressed=True)
t2 = time.perf_counter()
for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
    p = pathlib.Path(a.model) / f
    if p.exists():
        shutil.copy(p, pathlib.Path(a.out) / f)
print("RESULT " + json.dumps({"tool": "llmcompressor-awq", "bits": a.bits, "group_size": a.group_size, "sym": a.sym,
                              "oneshot_s": round(t1 - t0, 2), "save_s": round(t2 - t1, 2)}))
