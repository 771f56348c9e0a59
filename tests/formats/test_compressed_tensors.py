"""compressed-tensors pack-quantized: round trips, compressed-tensors' own (de)compression, transformers."""

import json
import logging
import re

import pytest
import torch
import transformers
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from safetensors.torch import load_file
from torch import nn

from quantkit.quant.affine import AffineWeight
from quantkit.backends import Recipe, quantize
from quantkit.backends.int4 import Int4Config
from quantkit.backends.rtn import RTNConfig
from quantkit.errors import QuantkitError
from quantkit.run.export import save_quantized
from quantkit.formats import format_for, get_format
from quantkit.formats.compressed_tensors import CompressedTensorsFormat
from quantkit.quant.linear import AffineLinear
from tests.conftest import random_model, tiny_config
from tests.helpers import GPTQLike, assert_same_affine, decompress_with_compressed_tensors, make_affine, relative

NAME = "model.layers.0.mlp.down_proj"
N, K = 48, 256  # N*3 bits is not a multiple of 32: 3-bit zero points straddle int32 words
GRID = [(bits, gs, sym) for bits in (2, 3, 4, 8) for gs in (32, 64, 128, -1) for sym in (True, False)]
# Multiples of 128 / 16 so that 4-bit linears run on the int4 kernels, as in real models.
HF_SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
MIXED_INT4 = Recipe(default=Int4Config(32), rules=[("down_proj", RTNConfig(8, -1))])


# -- helpers shared with test_gptq ----------------------------------------------------------------


def export(fmt, module: nn.Module, name: str = NAME) -> dict[str, torch.Tensor]:
    return relative(name, fmt.export_module(name, module))


# -- round trip and compressed-tensors' own compressor --------------------------------------------

def module_and_config(bits, gs, sym, dtype=torch.float32, bias=False):
    w = make_affine(N, K, bits, gs, sym)
    b = torch.randn(N) * 0.1 if bias else None
    fmt = CompressedTensorsFormat()
    qc = fmt.quantization_config({NAME: RTNConfig(bits, gs, sym)}, ["lm_head"])
    return AffineLinear(w, b, dtype=dtype), fmt, qc


@pytest.mark.parametrize("bits,gs,sym", GRID)
def test_round_trip_is_exact(bits, gs, sym):
    module, fmt, qc = module_and_config(bits, gs, sym)
    tensors = export(fmt, module)
    g = 1 if gs == -1 else K // gs
    expected = {"weight_packed": ((N, -(-K * bits // 32)), torch.int32), "weight_scale": ((N, g), torch.float32),
                "weight_shape": ((2,), torch.int64)}
    if not sym:
        expected["weight_zero_point"] = ((-(-N * bits // 32), g), torch.int32)
    assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == expected
    loaded = fmt.load_module(NAME, tensors, qc, torch.float32)
    assert_same_affine(loaded.affine_weight(), module.affine_weight())
    x = torch.randn(3, K)
    assert torch.equal(loaded(x), module(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_keeps_the_model_dtype_and_bias(dtype):
    module, fmt, qc = module_and_config(4, 32, False, dtype=dtype, bias=True)
    tensors = export(fmt, module)
    assert tensors["weight_scale"].dtype == dtype and tensors["bias"].dtype == dtype
    loaded = fmt.load_module(NAME, tensors, qc, dtype)
    assert_same_affine(loaded.affine_weight(), module.affine_weight())
    assert torch.equal(loaded.bias, module.bias)


@pytest.mark.parametrize("bits,gs,sym", GRID)
def test_compressed_tensors_decompresses_to_our_weights(bits, gs, sym):
    # compressed-tensors dequantizes as (q_s - z_s) * scale in the scale's dtype; our (q - z) is the same
    # integer, exact in any float dtype, so the weights are bit-identical, not merely close.
    module, fmt, qc = module_and_config(bits, gs, sym)
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    dense = PackedQuantizationCompressor.decompress(export(fmt, module), scheme)["weight"]
    assert dense.dtype == torch.float32 and torch.equal(dense, module.dequantize())


@pytest.mark.parametrize("bits,gs,sym", GRID)
def test_compressed_tensors_compresses_to_our_tensors(bits, gs, sym):
    # What llm-compressor writes: compressed-tensors' compressor fed our dequantized weight and qparams
    # (its zero points are signed: z - 2^(b-1)) must produce exactly our tensors.
    module, fmt, qc = module_and_config(bits, gs, sym)
    w = module.affine_weight()
    state = {"weight": module.dequantize(), "weight_scale": w.scale,
             "weight_zero_point": (w.zero - 2 ** (bits - 1)).to(torch.int8)}
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    theirs = PackedQuantizationCompressor.compress(state, scheme)
    ours = export(fmt, module)
    assert set(theirs) == set(ours)
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key


def test_odd_shapes_round_trip():
    # K*b and N*b not multiples of 32: the last words are partly filled along both packed dims.
    w = make_affine(40, 80, 3, -1, False)
    module, fmt = AffineLinear(w, dtype=torch.float32), CompressedTensorsFormat()
    qc = fmt.quantization_config({NAME: RTNConfig(3, -1, False)}, ["lm_head"])
    tensors = export(fmt, module)
    assert tensors["weight_packed"].shape == (40, 8) and tensors["weight_zero_point"].shape == (4, 1)
    assert_same_affine(fmt.load_module(NAME, tensors, qc, torch.float32).affine_weight(), w)
    scheme = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    assert torch.equal(PackedQuantizationCompressor.decompress(tensors, scheme)["weight"], w.dequantize())


# -- act-order --------------------------------------------------------------------------------------

def test_act_order_is_refused_with_the_way_out():
    # compressed-tensors 0.20 rejects actorder 'group' (the only layout with weight_g_idx).
    fmt = CompressedTensorsFormat()
    module = AffineLinear(make_affine(N, K, 4, 32, True, act_order=True), dtype=torch.float32)
    with pytest.raises(QuantkitError, match=r"down_proj: has an act-order g_idx: .*--format gptq"):
        fmt.export_module(NAME, module)
    with pytest.raises(QuantkitError, match="static_groups=True"):
        fmt.quantization_config({NAME: GPTQLike(desc_act=True)}, ["lm_head"])
    with pytest.raises(ValueError, match="has been removed"):  # what transformers would have hit
        QuantizationConfig.model_validate({"config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 32, "actorder": "group"}}}})


def test_static_groups_act_order_is_actorder_weight():
    # desc_act with static groups keeps groups contiguous: compressed-tensors' actorder 'weight'.
    fmt = CompressedTensorsFormat()
    qc = fmt.quantization_config({NAME: GPTQLike(desc_act=True, static_groups=True)}, ["lm_head"])
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    assert QuantizationConfig.model_validate(qc).config_groups["group_0"].weights.actorder == "weight"


def test_legacy_weight_g_idx_files_load():
    # Files llm-compressor wrote before compressed-tensors 0.20 (actorder 'group') carry weight_g_idx.
    w = make_affine(N, K, 4, 32, True, act_order=True)
    fmt = CompressedTensorsFormat()
    plain = AffineWeight(w.q, w.scale, w.zero, w.bits, w.group_size, w.symmetric)  # export refuses g_idx
    tensors = {**export(fmt, AffineLinear(plain, dtype=torch.float32)), "weight_g_idx": w.g_idx}
    qc = fmt.quantization_config({NAME: RTNConfig(4, 32, True)}, ["lm_head"])
    loaded = fmt.load_module(NAME, tensors, qc, torch.float32)
    assert_same_affine(loaded.affine_weight(), w)
    assert torch.equal(loaded.dequantize(), w.dequantize())


# -- quantization_config and how compressed-tensors resolves it --------------------------------------

def linear_names(cfg) -> list[str]:
    return [f"model.layers.{i}.{m}" for i in range(cfg.num_hidden_layers)
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_mixed_recipe_config_json():
    names = linear_names(tiny_config())
    configs = {n: MIXED_INT4.config_for(n) for n in names}
    qc = CompressedTensorsFormat().quantization_config(configs, ["lm_head"])
    group = {"input_activations": None, "output_activations": None, "format": "pack-quantized"}
    assert qc == {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {
            "group_0": {"targets": [r"re:.*\.mlp\.gate_proj$", r"re:.*\.mlp\.up_proj$", r"re:.*\.self_attn\.k_proj$",
                                    r"re:.*\.self_attn\.o_proj$", r"re:.*\.self_attn\.q_proj$",
                                    r"re:.*\.self_attn\.v_proj$"],
                        "weights": {"num_bits": 4, "type": "int", "symmetric": False, "group_size": 32,
                                    "strategy": "group", "dynamic": False, "observer": "minmax"}, **group},
            "group_1": {"targets": [r"re:.*\.mlp\.down_proj$"],
                        "weights": {"num_bits": 8, "type": "int", "symmetric": False, "group_size": -1,
                                    "strategy": "channel", "dynamic": False, "observer": "minmax"}, **group}},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {}, "transform_config": {}, "version": "0.20.0"}
    json.dumps(qc)  # config.json material


def test_single_scheme_targets_linear_as_llm_compressor_does():
    qc = CompressedTensorsFormat().quantization_config({n: Int4Config(128) for n in linear_names(tiny_config())},
                                                      ["lm_head"])
    assert [g["targets"] for g in qc["config_groups"].values()] == [["Linear"]]


def vllm_target(layer: str, cls: str, targets: list[str]) -> str | None:
    """vLLM's find_matched_target: the layer name (exact or re:), then the class name by substring, then,
    for a fused layer, the target all its shards match (the first shard's)."""
    def hit(value, t):
        return re.match(t[3:], value) is not None if t.startswith("re:") else t == value
    fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    found = next((t for t in targets if hit(layer, t)), None) or next((t for t in targets if t in cls), None)
    suffix = layer.rpartition(".")[2]
    if found is None and suffix in fused:
        shard_hits = [next((t for t in targets if hit(layer.replace(suffix, s), t)), None) for s in fused[suffix]]
        found = shard_hits[0] if all(shard_hits) else None
    return found


@pytest.mark.parametrize("recipe", [MIXED_INT4, Recipe(default=Int4Config(32), rules=[("_proj", RTNConfig(8, -1))],
                                                       ignore=["o_proj"])], ids=["mixed", "one scheme + ignore"])
def test_vllm_fused_layers_find_their_scheme(recipe):
    # Why mixed schemes use no 'Linear' target: vLLM would match its QKVParallelLinear to it by class name.
    names = linear_names(tiny_config())
    configs = {n: recipe.config_for(n) for n in names if recipe.config_for(n) is not None}
    qc = CompressedTensorsFormat().quantization_config(configs, ["lm_head"] + [n for n in names if n not in configs])
    to_group = {t: g for g, scheme in qc["config_groups"].items() for t in scheme["targets"]}
    scheme_of = {json.dumps(g["weights"], sort_keys=True): g for g in qc["config_groups"].values()}
    for layer, cls, shard in [("self_attn.qkv_proj", "QKVParallelLinear", "self_attn.q_proj"),
                              ("mlp.gate_up_proj", "MergedColumnParallelLinear", "mlp.gate_proj"),
                              ("mlp.down_proj", "RowParallelLinear", "mlp.down_proj")]:
        group = qc["config_groups"][to_group[vllm_target(f"model.layers.1.{layer}", cls, list(to_group))]]
        c = configs[f"model.layers.1.{shard}"]
        assert (group["weights"]["num_bits"], group["weights"]["group_size"]) == (c.bits, c.group_size), layer
    assert len(scheme_of) == len(qc["config_groups"])


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq"])
def test_warns_when_vllm_fused_shards_differ(caplog, fmt):
    """Before any work (export.check_layout), in every format vLLM serves."""
    from quantkit.run.export import check_layout
    from quantkit.formats import get_format

    names = linear_names(tiny_config())
    recipe = Recipe(default=Int4Config(32), rules=[("q_proj", RTNConfig(8, -1))]) if fmt != "gptq" else \
        Recipe(default=Int4Config(32), ignore=["q_proj"])
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        check_layout(get_format(fmt), {n: recipe.config_for(n) for n in names})
    assert "2 group(s) of linears that vLLM fuses mix schemes" in caplog.text
    assert "model.layers.0.self_attn.q_proj/k_proj/v_proj" in caplog.text


RECIPES = {
    "int4": Recipe(default=Int4Config(32)),
    "mixed": MIXED_INT4,
    "one layer differs": Recipe(default=RTNConfig(4, 64, True),
                                rules=[(r"layers\.0\.mlp\.down_proj", RTNConfig(8, -1))]),
    "three schemes and an ignore": Recipe(default=Int4Config(64), rules=[("q_proj", RTNConfig(8, 32, True)),
                                                                         ("up_proj", RTNConfig(2, 32))],
                                          ignore=[r"layers\.1\.self_attn\.o_proj"]),
}


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_compressed_tensors_gives_every_module_its_config(recipe):
    # compressed-tensors' own matching (apply_quantization_config, as transformers runs it) on a
    # transformers Llama must give each linear exactly the scheme quantkit quantized it with.
    cfg = tiny_config()
    names = linear_names(cfg)
    configs = {n: recipe.config_for(n) for n in names if recipe.config_for(n) is not None}
    ignored = ["lm_head"] + [n for n in names if n not in configs]
    qc = CompressedTensorsFormat().quantization_config(configs, ignored)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_dict()))
    apply_quantization_config(hf, QuantizationConfig.model_validate(qc))
    for name, module in hf.named_modules():
        if isinstance(module, nn.Linear):
            scheme = getattr(module, "quantization_scheme", None)
            got = None if scheme is None else (scheme.weights.num_bits, scheme.weights.group_size or -1,
                                               scheme.weights.symmetric)
            c = configs.get(name)
            want = None if c is None else (c.bits, c.group_size, getattr(c, "symmetric", False))
            assert got == want, name


def test_targets_name_single_modules_exactly():
    names = linear_names(tiny_config())
    configs = {n: RECIPES["one layer differs"].config_for(n) for n in names}
    qc = CompressedTensorsFormat().quantization_config(configs, ["lm_head"])
    targets = [g["targets"] for g in qc["config_groups"].values()]
    assert targets[1] == ["model.layers.0.mlp.down_proj"] and targets[0][-1] == "model.layers.1.mlp.down_proj"


# -- transformers interop -------------------------------------------------------------------------

IDS = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(1))
# The weights are bit-identical (checked first, and the real test: in this random model the std-1
# embeddings dominate the residual stream, so one group off by one step moves the logits only ~2e-4).
# The logits then agree to bf16 rounding: quantkit's int4 kernels compute in bf16 (quant/linear.py), while
# transformers runs the decompressed weights in fp32. Tolerance: bf16's epsilon relative to max |logit|.
BF16_EPS = 2.0**-8


def saved(tmp_path, recipe, seed=0):
    model = quantize(random_model(tiny_config(**HF_SHAPES), seed=seed), recipe)
    return model, save_quantized(model, tmp_path / "out", format="compressed-tensors")


def assert_matches(hf: nn.Module, model: nn.Module):
    """Every quantized linear's weight bit-identical, and the logits within bf16 rounding."""
    with torch.no_grad():
        logits = hf(IDS).logits  # the first forward decompresses modules transformers kept compressed
        expected = model(IDS)
    for name, module in model.named_modules():
        if isinstance(module, AffineLinear):
            assert torch.equal(hf.get_submodule(name).weight, module.dequantize()), name
    assert (logits - expected).abs().max() <= BF16_EPS * expected.abs().max()


def from_pretrained(path, **kwargs) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


DEQUANTIZE = dict(quantization_config=transformers.CompressedTensorsConfig(dequantize=True))


def test_transformers_loads_symmetric_mixed_precision(tmp_path):
    recipe = Recipe(default=RTNConfig(4, 32, True), rules=[("down_proj", RTNConfig(8, -1, True))])
    model, path = saved(tmp_path, recipe)
    assert_matches(from_pretrained(path), model)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_transformers_loads_int4_dequantized(tmp_path):
    # Asymmetric int4 loads through transformers' dequantize-at-load path (see the xfail below).
    model, path = saved(tmp_path, Recipe(default=Int4Config(32)))
    assert_matches(from_pretrained(path, **DEQUANTIZE), model)


def test_compressed_tensors_reads_the_mixed_int4_recipe(tmp_path):
    # The brief's recipe (int4 g32, down_proj 8-bit per channel, all asymmetric), which transformers
    # itself cannot load (xfails below): compressed-tensors' own machinery reads it exactly.
    model, path = saved(tmp_path, MIXED_INT4)
    config = json.loads((path / "config.json").read_text())
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    hf.load_state_dict(decompress_with_compressed_tensors(path), strict=True)
    assert_matches(hf, model)


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_quantkit_reloads_every_module_bit_exactly(tmp_path, recipe):
    # load_module resolves each module's config group as compressed-tensors does (exact, re:, 'Linear').
    model, path = saved(tmp_path, recipe)
    config = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    fmt = format_for(config["quantization_config"])
    quantized = fmt.quantized_modules(set(tensors))
    assert quantized == {n for n, m in model.named_modules() if isinstance(m, AffineLinear)}
    for name in quantized:
        own = {k.removeprefix(name + "."): t for k, t in tensors.items() if k.rpartition(".")[0] == name}
        loaded = fmt.load_module(name, own, config["quantization_config"], torch.float32)
        assert_same_affine(loaded.affine_weight(), model.get_submodule(name).affine_weight())


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason=(
    "compressed-tensors 0.20 compresses transformers' meta model without packing weight_zero_point: it "
    "expects [N, G] where its own compressor (and vLLM) write the packed [ceil(N*b/32), G], so "
    "transformers 5 loads no asymmetric pack-quantized checkpoint, llm-compressor's included"))
def test_transformers_loads_asymmetric_compressed(tmp_path):
    model, path = saved(tmp_path, MIXED_INT4)
    assert_matches(from_pretrained(path), model)


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "transformers 5's dequantize-at-load path decompresses every dense module with the first config group "
    "(get_dense_scheme): with mixed precision the other groups' modules load as garbage, silently"))
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_transformers_dequantizes_mixed_precision(tmp_path):
    model, path = saved(tmp_path, MIXED_INT4)
    assert_matches(from_pretrained(path, **DEQUANTIZE), model)


# -- registry and bad input -------------------------------------------------------------------------

def test_registry_finds_the_format():
    qc = CompressedTensorsFormat().quantization_config({NAME: Int4Config(32)}, ["lm_head"])
    assert isinstance(get_format("compressed-tensors"), CompressedTensorsFormat)
    assert isinstance(format_for(qc), CompressedTensorsFormat)
    assert not CompressedTensorsFormat.matches({**qc, "format": "float-quantized",
                                                "config_groups": {"g": {"format": "float-quantized"}}})
    assert CompressedTensorsFormat().quantized_modules({f"{NAME}.weight_packed", f"{NAME}.weight_scale",
                                                        "lm_head.weight"}) == {NAME}


def test_wrong_shape_names_the_tensor():
    module, fmt, qc = module_and_config(4, 32, False)
    tensors = export(fmt, module)
    with pytest.raises(QuantkitError, match=re.escape(f"{NAME}.weight_scale: is float32 [48, 4], expected")):
        fmt.load_module(NAME, {**tensors, "weight_scale": tensors["weight_scale"][:, :4]}, qc, torch.float32)
    with pytest.raises(QuantkitError, match=re.escape(f"{NAME}.weight_zero_point: is int32 [48, 8]")):
        fmt.load_module(NAME, {**tensors, "weight_zero_point": module.weight_zero_point}, qc, torch.float32)
    with pytest.raises(QuantkitError, match=re.escape(f"{NAME}.weight_packed: missing")):
        fmt.load_module(NAME, {k: v for k, v in tensors.items() if k != "weight_packed"}, qc, torch.float32)
    with pytest.raises(QuantkitError, match="unexpected tensor"):
        fmt.load_module(NAME, {**tensors, "input_scale": torch.ones(1)}, qc, torch.float32)


def test_refuses_what_it_cannot_hold():
    fmt = CompressedTensorsFormat()
    with pytest.raises(QuantkitError, match="not an integer-affine quantized linear"):
        fmt.export_module(NAME, nn.Linear(K, N))
    module, fmt, qc = module_and_config(4, 32, False)
    with pytest.raises(QuantkitError, match="listed in quantization_config.ignore"):
        fmt.load_module(NAME, export(fmt, module), {**qc, "ignore": ["re:.*down_proj$"]}, torch.float32)
