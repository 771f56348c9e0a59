"""Calibrated (GPTQ) quantization end to end: streamed and in-memory agree, both formats reload, errors."""

import pytest
import torch

import quantkit
from quantkit.backends.gptq import GPTQConfig
from quantkit.backends.rtn import RTNConfig
from quantkit.run.export import ExportOptions
from quantkit.run.calibrator import CalibrationOptions, quantize_calibrated
from quantkit.model.layout import SEQUENTIAL_GROUPS
from quantkit.errors import QuantkitError
from quantkit.model import save_model
from quantkit.run.pipeline import quantize_checkpoint
from quantkit.backends import Recipe
from tests.conftest import KERNEL_SHAPES, random_model, tiny_config
from tests.helpers import run as run_cli


SHAPES = KERNEL_SHAPES  # the shapes of kernel_model_dir
TOKENS = torch.randint(3, 4096, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = TOKENS[:2, :16]


CASES = [GPTQConfig(4, 32), GPTQConfig(3, 64, symmetric=True), GPTQConfig(4, 32, desc_act=True),
         GPTQConfig(4, 32, desc_act=True, static_groups=True), GPTQConfig(8, -1), GPTQConfig(2, 64, mse=True),
         GPTQConfig(4, 64, true_sequential=False)]


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("config", CASES, ids=lambda c: c.describe())
def test_streamed_export_reloads_to_the_in_memory_model(kernel_model_dir, tmp_path, config, fmt):
    in_memory = quantkit.load(kernel_model_dir)
    reports = quantize_calibrated(in_memory, config, TOKENS, progress=False)
    if fmt == "compressed-tensors" and config.desc_act and not config.static_groups:
        with pytest.raises(QuantkitError, match="act-order"):
            quantize_checkpoint(kernel_model_dir, config, tmp_path / "q", ExportOptions(format=fmt), calibration=TOKENS,
                                progress=False)
        return
    summary = quantize_checkpoint(kernel_model_dir, config, tmp_path / "q", ExportOptions(format=fmt), calibration=TOKENS,
                                  progress=False)
    with torch.no_grad():
        assert torch.equal(quantkit.load(tmp_path / "q")(IDS), in_memory(IDS))
    assert [e["name"] for e in summary.errors] == [r.name for r in reports]
    assert len(reports) == 14 and all(0 < r.relative_error < 1 for r in reports)


def test_true_sequential_order_and_per_linear_errors(kernel_model_dir):
    model = quantkit.load(kernel_model_dir)
    reports = quantize_calibrated(model, GPTQConfig(4, 32), TOKENS, progress=False)
    order = [name for group in SEQUENTIAL_GROUPS for name in group]
    assert [r.name for r in reports] == [f"model.layers.{i}.{n}" for i in range(2) for n in order]


def test_gptq_beats_rtn_on_the_model_output(kernel_model_dir):
    base = quantkit.load(kernel_model_dir, dtype="fp32")
    with torch.no_grad():
        ref = base(TOKENS)

    def error(model):
        with torch.no_grad():
            return (model(TOKENS) - ref).norm().item()

    gptq = quantkit.load(kernel_model_dir, dtype="fp32")
    quantize_calibrated(gptq, GPTQConfig(3, 32), TOKENS, progress=False)
    rtn = quantkit.quantize(quantkit.load(kernel_model_dir, dtype="fp32"), RTNConfig(3, 32))
    assert error(gptq) < error(rtn)


def test_mixed_recipe_gptq_and_rtn(kernel_model_dir, tmp_path):
    recipe = Recipe(GPTQConfig(4, 32), rules=[(r"down_proj$", RTNConfig(8, -1))], ignore=[r"layers\.1\.self_attn"])
    summary = quantize_checkpoint(kernel_model_dir, recipe, tmp_path / "q", ExportOptions(format="compressed-tensors"),
                                  calibration=TOKENS, progress=False)
    model = quantkit.load(tmp_path / "q")
    assert model.model.layers[0].mlp.down_proj.bits == 8
    assert type(model.model.layers[1].self_attn.q_proj) is torch.nn.Linear
    assert {e["method"] for e in summary.errors} == {"gptq", "rtn"}


# -- bad input -------------------------------------------------------------------------------------

def test_gptq_without_calibration(kernel_model_dir, tmp_path):
    with pytest.raises(QuantkitError, match="method gptq needs calibration data: pass --calib"):
        quantize_checkpoint(kernel_model_dir, GPTQConfig(), tmp_path / "q", progress=False)
    with pytest.raises(QuantkitError, match="needs calibration data"):
        quantkit.quantize(quantkit.load(kernel_model_dir), GPTQConfig())


@pytest.mark.parametrize("tokens, message", [
    (torch.randint(0, 10, (4,)), "must be 2-D \\[n_samples, seq_len\\]"),
    (torch.rand(4, 8), "must be integers"),
    (torch.full((2, 8), 5000), "token id 5000 is outside the tokenizer's vocabulary \\[0, 4096\\)"),
])
def test_bad_calibration_tensor(kernel_model_dir, tmp_path, tokens, message):
    with pytest.raises(QuantkitError, match=message):
        quantize_checkpoint(kernel_model_dir, GPTQConfig(4, 32), tmp_path / "q", calibration=tokens, progress=False)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("make, message", [
    (lambda: GPTQConfig(bits=5), "--bits 5 is not supported"),
    (lambda: GPTQConfig(damp_percent=0), "--damp 0 must be in"),
    (lambda: GPTQConfig(group_size=-1, static_groups=True), "--static-groups needs a --group-size"),
])
def test_bad_gptq_options(make, message):
    with pytest.raises(QuantkitError, match=message):
        make()


def test_token_file_needs_no_tokenizer(kernel_model_dir, tmp_path):
    (kernel_model_dir / "tokenizer.model").unlink()
    torch.save(TOKENS, tmp_path / "tokens.pt")
    summary = quantize_checkpoint(kernel_model_dir, GPTQConfig(4, 32), tmp_path / "q", progress=False,
                                  calibration=CalibrationOptions(str(tmp_path / "tokens.pt"), n_samples=8, seq_len=32))
    assert len(summary.errors) == 14


def test_gptq_calibrates_a_model_with_pretraining_tp(kernel_model_dir):
    """pretraining_tp slices bypass the linears' forward hooks: calibration must run at tp=1, not see zero Hessians."""
    model = quantkit.load(kernel_model_dir, dtype="fp32")
    model.set_pretraining_tp(2)
    reports = quantize_calibrated(model, GPTQConfig(4, 32), TOKENS, progress=False)
    assert all(0 < r.relative_error < 1 and r.kind == "output" for r in reports)
    assert model.model.layers[0].self_attn.pretraining_tp == 2
    assert model.model.layers[0].self_attn.q_proj.dequantize().abs().sum() > 0


# -- the calibration dtype: never a smaller range than the checkpoint's; overflows named where they happen ------

def overflowing_model(layer: int = 0, part: str = "mlp", scale: float = 300.0):
    """A tiny model whose decoder layer `layer` sends activations past fp16's 65504 in `part` (fp32 max ~1.5e6);
    its weights stay within fp16's range (|w| < 250), so the fp16 checkpoint itself is sound."""
    model = random_model(tiny_config(**SHAPES))
    names = {"mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "self_attn": ("self_attn.v_proj",
                                                                                    "self_attn.o_proj")}[part]
    with torch.no_grad():
        for name in names:
            model.model.layers[layer].get_submodule(name).weight.mul_(scale if part == "mlp" else 10 * scale)
    return model


def save(model, tmp_path, tokenizer_file, dtype: str, name: str = "src"):
    save_model(model, tmp_path / name, tokenizer_dir=tokenizer_file.parent, dtype=dtype)
    return tmp_path / name


@pytest.mark.parametrize("checkpoint, calib", [("bf16", "fp16"), ("fp32", "fp16")])
def test_a_calib_dtype_with_a_smaller_range_than_the_checkpoint_is_refused_up_front(tmp_path, tokenizer_file,
                                                                                     checkpoint, calib):
    src = save(overflowing_model(), tmp_path, tokenizer_file, checkpoint)
    message = (rf"^--calib-dtype {calib}: float16's range \(65504\) is smaller than the checkpoint's \w+ "
               rf"\(3.\d+e\+38\), so calibration could overflow: use --calib-dtype fp32 or leave it out \(auto\)$")
    with pytest.raises(QuantkitError, match=message):
        quantize_checkpoint(src, GPTQConfig(4, 32), tmp_path / "q", progress=False,
                            calibration=CalibrationOptions("no-such-file.txt", dtype=calib))  # refused before reading
    assert not (tmp_path / "q").exists()
    with pytest.raises(QuantkitError, match=r"^--calib-dtype fp16: .* than the model's"):
        quantize_calibrated(quantkit.load(src), GPTQConfig(4, 32), TOKENS, progress=False, dtype=calib)


@pytest.mark.parametrize("source, export, device, auto", [
    ("fp16", "fp16", "cpu", "fp32"), ("bf16", "bf16", "cpu", "fp32"), ("fp32", "fp32", "cpu", "fp32"),
    ("fp16", "fp16", "cuda", "fp16"), ("bf16", "bf16", "cuda", "bf16"), ("fp32", "fp32", "cuda", "fp32"),
    ("bf16", "fp16", "cuda", "fp32"), ("fp32", "bf16", "cuda", "fp32")])
def test_the_auto_calibration_dtype(monkeypatch, source, export, device, auto):
    """fp32 on CPU; on CUDA the checkpoint's own dtype, unless the layers are written in another (then fp32)."""
    import quantkit.run.calibrator as calibrator
    from quantkit.dtypes import parse_dtype

    monkeypatch.setattr(calibrator, "check_device", torch.device)  # this machine may have no CUDA
    got = calibrator.calibration_dtype(None, parse_dtype(source), device, export=parse_dtype(export))
    assert got == parse_dtype(auto)


@pytest.mark.parametrize("export, calib", [("fp16", "bf16"), ("fp32", "bf16"), ("bf16", "fp16")])
def test_a_calib_dtype_that_would_round_the_written_layers_is_refused(kernel_model_dir, tmp_path, export, calib):
    """fp16 -> bf16 -> fp16 is not the identity: calibration runs in the export dtype or in float32 only."""
    from quantkit.run.calibrator import calibration_dtype

    message = (rf"^--calib-dtype {calib}: \w+ cannot hold the \w+ layers' values exactly, so the written norms and "
               rf"weights would change: use --calib-dtype fp32 or {export}, or leave it out \(auto\)$")
    with pytest.raises(QuantkitError, match=message):
        quantize_checkpoint(kernel_model_dir, GPTQConfig(4, 32), tmp_path / "q", ExportOptions(dtype=export), progress=False,
                            calibration=CalibrationOptions(TOKENS, dtype=calib))
    assert not (tmp_path / "q").exists()
    dtypes = [quantkit.dtypes.parse_dtype(d) for d in (export, calib)]
    assert calibration_dtype(None, dtypes[0], export=dtypes[1]) == torch.float32  # auto on CPU


@pytest.mark.parametrize("model_dtype, requested, computed", [
    ("fp16", None, torch.float32), ("bf16", None, torch.float32), ("fp32", None, torch.float32),
    ("fp16", "fp16", torch.float16), ("bf16", "bf16", torch.bfloat16), ("fp16", "fp32", torch.float32),
    ("bf16", "fp32", torch.float32)])
def test_calibration_computes_in_the_calibration_dtype_and_the_model_keeps_its_own(kernel_model_dir, monkeypatch,
                                                                                  model_dtype, requested, computed):
    """On CPU, auto is fp32; GPTQ's observers see activations in the calibration dtype; the model's tensors keep
    the model's dtype (quantized modules' scales and biases, norms, everything)."""
    from quantkit.backends.gptq import HessianObserver

    seen = set()
    original = HessianObserver.add
    monkeypatch.setattr(HessianObserver, "add", lambda self, x: (seen.add(x.dtype), original(self, x))[1])
    model = quantkit.load(kernel_model_dir, dtype=model_dtype)
    quantize_calibrated(model, GPTQConfig(4, 32), TOKENS, progress=False, dtype=requested)
    assert seen == {computed}
    floats = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    assert floats == {quantkit.dtypes.parse_dtype(model_dtype)}
    assert {m.dtype for m in model.modules() if hasattr(m, "weight_scale")} == floats


@pytest.mark.parametrize("layer, part", [(0, "mlp"), (1, "mlp"), (0, "self_attn")])
def test_activations_that_overflow_fp16_are_named_with_the_fix(tmp_path, tokenizer_file, layer, part):
    src = save(overflowing_model(layer, part), tmp_path, tokenizer_file, "fp16")
    message = (rf"^model\.layers\.{layer}: calibration activations are not finite after {part} \(computing in "
               rf"float16\): its activations exceed float16's range \(65504\): rerun with --calib-dtype fp32$")
    with pytest.raises(QuantkitError, match=message):
        quantize_checkpoint(src, GPTQConfig(4, 32), tmp_path / "q", progress=False,
                            calibration=CalibrationOptions(TOKENS, dtype="fp16"))
    assert not (tmp_path / "q").exists()
    summary = quantize_checkpoint(src, GPTQConfig(4, 32), tmp_path / "q", progress=False, calibration=TOKENS)
    assert len(summary.errors) == 14 and all(0 < e["relative_error"] < 1 for e in summary.errors)  # auto: fp32


@pytest.mark.parametrize("scale, where", [
    (1e20, r"model\.layers\.1: calibration activations are not finite after mlp"),
    (1e13, r"model\.layers\.1\.mlp\.down_proj: its calibration statistic \(hessian\) is not finite"),  # x x^T only
], ids=["activations", "hessian"])
def test_non_finite_values_in_fp32_blame_the_weights(kernel_model_dir, scale, where):
    """Weights whose products leave fp32's range: every weight is finite, the activations (or, first, the
    down_proj Hessian's x x^T) are not: damaged weights, not a dtype to change."""
    model = quantkit.load(kernel_model_dir, dtype="fp32")
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(model.model.layers[1].mlp, name).weight.mul_(scale)
    with pytest.raises(QuantkitError, match=rf"^{where} \(computing in float32\): non-finite activations in float32: "
                                            r"the checkpoint's weights are damaged \(check them with quantkit eval\)$"):
        quantize_calibrated(model, GPTQConfig(4, 32), TOKENS, progress=False)


def test_a_nan_weight_is_named_before_the_calibration_pass_blames_the_dtype(kernel_model_dir):
    model = quantkit.load(kernel_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(QuantkitError, match=r"^model\.layers\.0\.mlp\.up_proj: contains NaN or Inf"):
        quantize_calibrated(model, GPTQConfig(4, 32), TOKENS, progress=False, dtype="fp16")


def test_a_non_finite_hessian_names_the_linear_and_the_cause(kernel_model_dir, monkeypatch):
    """Belt and braces behind the forward checks: a statistic that is not finite is named, GPTQ never runs."""
    from quantkit.backends.gptq import HessianObserver

    monkeypatch.setattr(HessianObserver, "handler_kwargs", lambda self: {"hessian": self.H * float("inf")})
    with pytest.raises(QuantkitError, match=r"^model\.layers\.0\.self_attn\.q_proj: its calibration statistic "
                                            r"\(hessian\) is not finite \(computing in float16\): its activations "
                                            r"exceed float16's range \(65504\): rerun with --calib-dtype fp32$"):
        quantize_calibrated(quantkit.load(kernel_model_dir), GPTQConfig(4, 32), TOKENS, progress=False, dtype="fp16")


def test_quantize_cli_names_the_overflow_and_auto_calibrates(tmp_path, tokenizer_file):
    from click.testing import CliRunner

    from quantkit.cli import main

    src = save(overflowing_model(), tmp_path, tokenizer_file, "fp16")
    torch.save(TOKENS, tmp_path / "tokens.pt")
    args = ["quantize", str(src), "-o", str(tmp_path / "q"), "--method", "gptq", "--group-size", "32",
            "--calib", str(tmp_path / "tokens.pt"), "--n-samples", "8", "--seq-len", "32"]
    refused = CliRunner().invoke(main, args + ["--calib-dtype", "fp16"])
    errors = [line for line in refused.output.splitlines() if line.startswith("Error: ")]  # besides tqdm's bars
    assert refused.exit_code == 1 and len(errors) == 1 and "Traceback" not in refused.output, refused.output
    assert errors[0].startswith("Error: model.layers.0: calibration activations are not finite after mlp")
    assert errors[0].endswith("rerun with --calib-dtype fp32") and not (tmp_path / "q").exists()
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert "relative output error per linear" in done.output and "dead inputs" not in done.output
    ignored = CliRunner().invoke(main, ["quantize", str(src), "-o", str(tmp_path / "r"), "--method", "rtn",
                                        "--calib-dtype", "fp32"])
    assert ignored.exit_code == 2 and "--calib-dtype applies with --calib" in ignored.output


def test_offload_and_batch_size_flags_reach_the_calibrator(src, tokens, tmp_path):
    """--offload-activations gives the same bytes (here CPU to CPU: the activations' home is the device's);
    --calib-batch-size is the windows a batch (in the run's fingerprint)."""
    def run(out, *flags):
        result = run_cli("quantize", src, "-o", tmp_path / out, "--method", "gptq", "--group-size", "32",
                         "--calib", tokens, "--n-samples", "8", "--seq-len", "32", *flags)
        assert result.exit_code == 0, result.output
        return tmp_path / out
    plain, offloaded = run("plain", "--calib-batch-size", "3"), run("offloaded", "--calib-batch-size", "3",
                                                                     "--offload-activations")
    for f in sorted(plain.glob("*.safetensors")):
        assert f.read_bytes() == (offloaded / f.name).read_bytes(), f.name


@pytest.mark.parametrize("flag", [["--offload-activations"], ["--calib-batch-size", "4"]])
def test_calibration_flags_without_calib_are_usage_errors(src, tmp_path, flag):
    result = run_cli("quantize", src, "-o", tmp_path / "q", "--method", "rtn", *flag)
    assert result.exit_code == 2 and f"{flag[0]} applies with --calib" in result.output


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "full passes"])
def test_linears_reading_one_input_share_one_hessian_and_nothing_changes(monkeypatch, staged):
    """q/k/v and gate/up read one input each: one Hessian per group (4 a layer, not 7), the same model bit for bit
    as with one per linear."""
    from quantkit.backends.gptq import HessianObserver
    from quantkit.run.calibrator import LayerCalibrator

    monkeypatch.setattr(LayerCalibrator, "staged", staged)
    made = []
    real = HessianObserver.__init__

    def counting(self, *args, **kwargs):
        made.append(self)
        real(self, *args, **kwargs)
    monkeypatch.setattr(HessianObserver, "__init__", counting)

    def calibrated():
        model = random_model(tiny_config(**KERNEL_SHAPES))
        tokens = torch.randint(0, 4096, (5, 16), generator=torch.Generator().manual_seed(2))
        quantize_calibrated(model, GPTQConfig(4, 32, desc_act=True), tokens, batch_size=2, progress=False)
        return model.state_dict(), model.config.num_hidden_layers

    shared, layers = calibrated()
    assert len(made) == 4 * layers
    made.clear()
    monkeypatch.setattr(HessianObserver, "shared_by_inputs", False)
    separate, _ = calibrated()
    assert len(made) == 7 * layers
    assert all(torch.equal(shared[k], separate[k]) for k in shared)
