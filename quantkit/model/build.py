"""The native model from a dense `Checkpoint`: built on the meta device and filled tensor by tensor, on a device
this machine has. quantkit.formats.reader builds quantized checkpoints the same way."""

from __future__ import annotations

import torch
from quantkit.errors import QuantkitError
from quantkit.model.checkpoint import Checkpoint, set_tensor
from quantkit.model.llama import LlamaForCausalLM


def check_device(device: str | torch.device) -> torch.device:
    """The device, if this machine has it: a missing CUDA is one clear error, not torch's assertion."""
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise QuantkitError(f"--device {device}: not a device ({e}): use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuantkitError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}): "
                            f"use --device cpu")
    return device


def build_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """The model on the meta device, filled tensor by tensor from `ckpt.shapes` (never two copies in memory).

    Modules stored quantized stay on the meta device: quantkit.formats.reader puts their runtime modules in.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(ckpt.config)
    for name, t in ckpt.read(ckpt.shapes, dtype):
        set_tensor(model, name, t.to(device))
    model.source_dir = ckpt.dir
    return model


def ready_for_inference(model: LlamaForCausalLM) -> LlamaForCausalLM:
    model.tie_weights()
    return model.eval().requires_grad_(False)
