"""Every method x format writes the same bytes as when tests/data/export_digests.json was recorded.

A move of code (issue 24's folders, configs, names) must leave every exported tensor and config byte-identical.
One case per method x format on the bundled demo model; GPTQ's float reductions depend on torch's thread count,
so every case runs on one thread. After a deliberate change of output, rewrite the file with
`QUANTKIT_UPDATE_DIGESTS=1 pytest tests/test_export_digests.py` and say why in the commit.
(bench/check_exports.py is the wider version: more cases, a reference model, per-tensor tables.)
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open

import quantkit
from quantkit.backends.registry import QuantConfig
from tests.conftest import DEMO_MODEL, REPO

DIGESTS = REPO / "tests" / "data" / "export_digests.json"
CALIB = {"source": str(DEMO_MODEL / "train.txt"), "n_samples": 4, "seq_len": 64}
CASES = {
    "int4-g128-compressed-tensors": ({"method": "int4", "group_size": 128}, "compressed-tensors", None),
    "int4-g64-gptq": ({"method": "int4", "group_size": 64}, "gptq", None),
    "rtn-b4-sym-gptq": ({"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True}, "gptq", None),
    "rtn-b3-asym-gptq": ({"method": "rtn", "bits": 3, "group_size": 128, "symmetric": False}, "gptq", None),
    "rtn-b8-channel-compressed-tensors": ({"method": "rtn", "bits": 8, "group_size": -1}, "compressed-tensors", None),
    "gptq-b4-gptq": ({"method": "gptq", "bits": 4, "group_size": 128}, "gptq", CALIB),
    "gptq-b4-static-actorder-compressed-tensors": ({"method": "gptq", "bits": 4, "group_size": 64, "desc_act": True,
                                                    "static_groups": True},
                                                   "compressed-tensors", CALIB),
    "gptq-b3-actorder-sym-mse-gptq": ({"method": "gptq", "bits": 3, "group_size": 64, "symmetric": True,
                                       "desc_act": True, "mse": True}, "gptq", CALIB),
    "bnb-int8": ({"method": "bnb-int8"}, "bnb", None),
    "bnb-nf4": ({"method": "bnb-nf4"}, "bnb", None),
    "bnb-fp4": ({"method": "bnb-fp4"}, "bnb", None),
}


def digest(out) -> dict[str, str]:
    """One sha256 over every tensor's name, dtype, shape and bytes; one per JSON config the runtimes read."""
    tensors, count = hashlib.sha256(), 0
    for path in sorted(out.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                tensors.update(f"{name}{t.dtype}{tuple(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes())
                count += 1
    found = {f"{count} tensors": tensors.hexdigest()}
    for name in ("config.json", "quantize_config.json"):
        if (out / name).exists():
            found[name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_bytes_unchanged(case, tmp_path, one_thread):
    config_dict, fmt, calibration = CASES[case]
    config = QuantConfig.from_dict(config_dict)
    out = tmp_path / "out"
    calib = quantkit.CalibrationOptions(**calibration) if calibration else None
    quantkit.quantize_checkpoint(DEMO_MODEL, config, out, quantkit.ExportOptions(format=fmt), calibration=calib,
                                 progress=False)
    found = digest(out)
    recorded = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
    if os.environ.get("QUANTKIT_UPDATE_DIGESTS"):
        recorded[case] = found
        DIGESTS.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
    assert case in recorded, f"no digests for {case}: record them with QUANTKIT_UPDATE_DIGESTS=1"
    changed = sorted(k for k in found.keys() | recorded[case].keys() if found.get(k) != recorded[case].get(k))
    assert not changed, f"{case}: {len(changed)} differ from the recorded bytes: {changed} (bench/check_exports.py --compare names the tensors)"
