"""GGUF blocks (quantkit/formats/gguf.py): quantkit's affine weights in ggml's Q4_0 / Q4_1 / Q8_0 blocks, decoded by
gguf's own dequantizer (llama.cpp's Python package) and compared with quantkit's dequantized weights."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf import gguf_blocks, gguf_type, permute_rows, read_gguf, unpermute_rows, write_gguf
from quantkit.quant.affine import quantize_weight


def weight(n: int, k: int, bits: int, symmetric: bool, dtype=torch.float16, seed: int = 0):
    torch.manual_seed(seed)
    w = (torch.randn(n, k) * 0.05).to(dtype)
    w[0, 3] = 0.9  # an outlier: a block whose range it stretches
    return quantize_weight(w, bits, 32, symmetric)


def exact(w) -> torch.Tensor:
    """(q - z) s (N, K) in fp32, with no rounding of the product (quantkit's fp16 dequantize rounds it)."""
    return (w.q.float() - w.zero.float().repeat_interleave(32, 1)) * w.scale.float().repeat_interleave(32, 1)


def decoded(blocks: np.ndarray, qtype, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks, qtype).reshape(n, k).astype(np.float32))


@pytest.mark.parametrize("shape", [(64, 128), (24, 96), (1, 32)])
@pytest.mark.parametrize("bits,symmetric,kind", [(4, True, "Q4_0"), (8, True, "Q8_0")])
def test_symmetric_blocks_decode_to_quantkits_weights_exactly(bits, symmetric, kind, shape):
    w = weight(*shape, bits, symmetric)
    blocks, qtype = gguf_blocks(w)
    assert qtype == getattr(gguf.GGMLQuantizationType, kind)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert blocks.dtype == np.uint8 and blocks.shape == (shape[0], shape[1] // block * size)
    got = decoded(blocks, qtype, *shape)
    assert torch.equal(got, exact(w))  # (q - z) s in fp32: exact for fp16 s
    assert torch.equal(got.half(), w.dequantize(torch.float16))  # what quantkit's fp16 model computes with


@pytest.mark.parametrize("shape", [(64, 128), (24, 96)])
def test_asymmetric_4bit_blocks_differ_only_by_the_minimums_fp16_rounding(shape):
    """Q4_1's w = d q + m, m = -s z in fp16: the only change, bounded by half an fp16 step of m."""
    w = weight(*shape, 4, False)
    blocks, qtype = gguf_blocks(w)
    assert qtype == gguf.GGMLQuantizationType.Q4_1
    got = decoded(blocks, qtype, *shape)
    m = (-w.scale.float() * w.zero.float()).repeat_interleave(32, dim=1)
    exact = w.q.float() * w.scale.float().repeat_interleave(32, dim=1) + m
    assert ((got - exact).abs() <= m.abs() * 2.0 ** -11 + 1e-7).all()
    d = w.scale.float().repeat_interleave(32, dim=1)
    q = w.q.float()
    torch.testing.assert_close(got, d * q + m.half().float(), rtol=0, atol=1e-7)  # exactly d q + fp16(m)


def test_fp32_scales_are_rounded_to_fp16():
    w = weight(16, 64, 4, True, dtype=torch.float32)
    blocks, qtype = gguf_blocks(w)
    expected = (w.q.float() - 8) * w.scale.half().float().repeat_interleave(32, dim=1)
    assert torch.equal(decoded(blocks, qtype, 16, 64), expected)


@pytest.mark.parametrize("bits,group_size,symmetric,act_order", [
    (4, 128, True, False), (4, -1, False, False), (3, 32, True, False), (8, 32, False, False), (2, 32, False, False),
    (4, 32, True, True)])
def test_schemes_gguf_cannot_hold_are_refused_in_one_line(bits, group_size, symmetric, act_order):
    with pytest.raises(QuantkitError) as e:
        gguf_type(bits, group_size, symmetric, act_order, name="model.layers.0.mlp.up_proj")
    message = str(e.value)
    assert "\n" not in message and message.startswith("model.layers.0.mlp.up_proj: ")
    assert "--group-size 32" in message and "Q4_0" in message and "--format gguf -o OUT.gguf" in message


def test_act_order_weights_are_refused():
    w = weight(8, 64, 4, True)
    w.g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(0)).int() // 32
    with pytest.raises(QuantkitError, match="act-order"):
        gguf_blocks(w, "q")


@pytest.mark.parametrize("n_head,n_head_kv,rows", [(4, None, 64), (4, 2, 32)])
def test_q_and_k_rows_are_permuted_as_llama_cpps_converter_does(n_head, n_head_kv, rows):
    """Per head of D rows: 0, D/2, 1, D/2 + 1, ... (interleaving transformers' rotary halves)."""
    heads = n_head_kv or n_head
    D = rows // heads
    got = permute_rows(np.arange(rows), heads)
    expected = [h * D + j // 2 + (D // 2) * (j % 2) for h in range(heads) for j in range(D)]
    assert got.tolist() == expected
    blocks = np.arange(rows * 18, dtype=np.uint8).reshape(rows, 18)  # whole rows of blocks move
    assert np.array_equal(permute_rows(blocks, heads), blocks[got])


def written(tmp_path, config, tokenizer_dir, recipe=None):
    """A GGUF with quantkit's metadata and vocabulary (and one F16 tensor), read back with gguf's reader."""
    from quantkit.formats.gguf import add_llama, add_vocabulary
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    add_llama(writer, config, gguf.LlamaFileType.MOSTLY_Q4_0, recipe)
    add_vocabulary(writer, tokenizer_dir, config.vocab_size)
    writer.add_tensor("output_norm.weight", np.ones(config.hidden_size, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path)


def field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i].tolist()[0] if f.types[-1] != gguf.GGUFValueType.STRING else bytes(f.parts[i])
                for i in f.data]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


def test_metadata_and_vocabulary_are_the_converters(tmp_path):
    import sentencepiece
    from tests.conftest import DEMO_MODEL, tiny_config
    config = tiny_config(num_key_value_heads=2, vocab_size=4100, rope_theta=500000.0)  # 4 padded rows
    reader = written(tmp_path, config, DEMO_MODEL, recipe={"method": "gptq", "bits": 4})
    expected = {"general.architecture": "llama", "llama.context_length": 64, "llama.embedding_length": 64,
                "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                "llama.rope.freq_base": 500000.0, "general.file_type": 2, "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.add_bos_token": True,
                "tokenizer.ggml.add_eos_token": False}
    assert {k: field(reader, k) for k in expected} == expected
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert json.loads(field(reader, "quantkit.recipe")) == {"method": "gptq", "bits": 4}
    sp = sentencepiece.SentencePieceProcessor(model_file=str(DEMO_MODEL / "tokenizer.model"))
    tokens, scores = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(scores) == len(types) == 4100
    assert [t.decode() for t in tokens[:4096]] == [sp.id_to_piece(i) for i in range(4096)]
    assert scores[:4096] == pytest.approx([sp.get_score(i) for i in range(4096)])
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert tokens[4096:] == [f"[PAD{i}]".encode() for i in range(4096, 4100)]
    assert set(types[4096:]) == {gguf.TokenType.UNUSED}


def test_a_tokenizer_without_sentencepiece_pieces_is_refused(tmp_path):
    from quantkit.formats.gguf import add_vocabulary
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(QuantkitError, match="no tokenizer.model") as e:
        add_vocabulary(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), tmp_path, 4096)
    assert "\n" not in str(e.value)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    from quantkit.formats.gguf import add_vocabulary
    from tests.conftest import DEMO_MODEL
    with pytest.raises(QuantkitError, match="4096 tokens for a model of 4000 embedding rows"):
        add_vocabulary(gguf.GGUFWriter(tmp_path / "x.gguf", "llama"), DEMO_MODEL, 4000)


def test_rope_scaling_other_than_linear_is_refused():
    from quantkit.formats.gguf import add_llama
    from tests.conftest import tiny_config
    config = tiny_config(rope_type="dynamic", rope_factor=2.0)
    with pytest.raises(QuantkitError, match="rope_type 'dynamic'"):
        add_llama(gguf.GGUFWriter("unused.gguf", "llama"), config, 2)


@pytest.mark.parametrize("bits,symmetric,kind", [(4, True, "Q4_0"), (4, False, "Q4_1"), (8, True, "Q8_0")])
def test_a_quantized_model_reads_back_from_its_gguf(tmp_path, bits, symmetric, kind):
    """Every tensor of write_gguf's file, decoded by gguf's reader and dequantizer, is quantkit's: the quantized
    linears' (q - z) s exactly (Q4_1: up to its fp16 minimum), the rest bit for bit; q/k rows in llama.cpp's order."""
    import quantkit
    from quantkit.backends.rtn import RTNConfig
    from quantkit.quant.linear import AffineLinear
    from tests.conftest import DEMO_MODEL, random_model, tiny_config
    config = tiny_config(num_key_value_heads=2)
    model = quantkit.quantize(random_model(config).half(), RTNConfig(bits=bits, group_size=32, symmetric=symmetric))
    path = write_gguf(model, tmp_path / "m.gguf", DEMO_MODEL, recipe={"method": "rtn"})
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.file_type") == getattr(gguf.LlamaFileType, f"MOSTLY_{kind}")
    stored = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    modules = dict(model.named_modules())
    expected_names = set()
    for name, p in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        if isinstance(modules.get(module_name), AffineLinear) or "." not in name:
            continue
        expected_names.add(names.get_name(name, try_suffixes=(".weight",)))
        t = stored[names.get_name(name, try_suffixes=(".weight",))]
        # matrices in their dtype, vectors (the norms) in F32 as llama.cpp's converter writes them: both exact
        assert t.tensor_type == (gguf.GGMLQuantizationType.F16 if p.dim() == 2 else gguf.GGMLQuantizationType.F32)
        assert np.array_equal(np.asarray(t.data).reshape(p.shape), p.detach().float().numpy())
    for name, m in modules.items():
        if not isinstance(m, AffineLinear):
            continue
        t = stored[names.get_name(name + ".weight", try_suffixes=(".weight",))]
        expected_names.add(t.name)
        assert t.tensor_type == getattr(gguf.GGMLQuantizationType, kind)
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(m.out_features, m.in_features)
        if name.endswith("q_proj"):
            got = unpermute_rows(got, config.num_attention_heads)
        elif name.endswith("k_proj"):
            got = unpermute_rows(got, config.num_key_value_heads)
        w = m.affine_weight()
        tolerance = 0 if symmetric else float((w.scale.float() * w.zero.float()).abs().max()) * 2.0 ** -11
        assert (torch.from_numpy(got.astype(np.float32)) - exact(w)).abs().max() <= tolerance + 1e-7, name
    assert set(stored) == expected_names  # nothing else, nothing missing


def test_a_directory_is_not_a_gguf_path(tmp_path):
    import quantkit
    from quantkit.backends.rtn import RTNConfig
    from tests.conftest import random_model, tiny_config
    model = quantkit.quantize(random_model(tiny_config()).half(), RTNConfig(bits=4, group_size=32, symmetric=True))
    with pytest.raises(QuantkitError, match="is a directory: GGUF is one file"):
        write_gguf(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_scheme_gguf_cannot_hold_leaves_no_file(tmp_path):
    import quantkit
    from quantkit.backends.rtn import RTNConfig
    from tests.conftest import random_model, tiny_config
    model = quantkit.quantize(random_model(tiny_config()).half(), RTNConfig(bits=4, group_size=64, symmetric=True))
    with pytest.raises(QuantkitError, match="--group-size 32"):
        write_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("n_head,n_head_kv", [(4, None), (4, 2)])
def test_unpermute_undoes_permute(n_head, n_head_kv):
    rows = np.arange(64 * 3).reshape(64, 3)
    assert np.array_equal(unpermute_rows(permute_rows(rows, n_head_kv or n_head), n_head_kv or n_head), rows)


def test_read_gguf_gives_back_the_config_and_the_weights(tmp_path):
    """write_gguf then read_gguf: the config's fields, every float tensor bit for bit, the Q4_0 linears' (q - 8) s."""
    import quantkit
    from quantkit.backends.rtn import RTNConfig
    from quantkit.quant.linear import AffineLinear
    from tests.conftest import DEMO_MODEL, random_model, tiny_config
    config = tiny_config(num_key_value_heads=2, rope_theta=20000.0)
    model = quantkit.quantize(random_model(config).half(), RTNConfig(bits=4, group_size=32, symmetric=True))
    got_config, tensors = read_gguf(write_gguf(model, tmp_path / "m.gguf", DEMO_MODEL))
    for field_name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
                       "tie_word_embeddings"):
        assert getattr(got_config, field_name) == getattr(config, field_name), field_name
    assert got_config.rms_norm_eps == pytest.approx(config.rms_norm_eps)
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, AffineLinear):
            expected[name + ".weight"] = exact(m.affine_weight())
    for name, p in model.named_parameters():
        expected.setdefault(name, p.detach().float())
    assert set(tensors) == set(expected)
    for name, t in tensors.items():
        assert torch.equal(t, expected[name]), name


def test_read_gguf_refuses_what_is_not_a_llama_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(QuantkitError, match="not a GGUF file"):
        read_gguf(bad)
    writer = gguf.GGUFWriter(tmp_path / "g.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(QuantkitError, match="architecture 'gpt2'"):
        read_gguf(tmp_path / "g.gguf")


@pytest.fixture
def gguf_file(tmp_path):
    import quantkit
    from quantkit.backends.rtn import RTNConfig
    from tests.conftest import DEMO_MODEL, random_model, tiny_config
    model = quantkit.quantize(random_model(tiny_config()).half(), RTNConfig(bits=4, group_size=32, symmetric=True))
    return write_gguf(model, tmp_path / "m.gguf", DEMO_MODEL)


def test_verify_passes_a_good_gguf_and_names_what_is_wrong(gguf_file, tmp_path):
    from quantkit.formats.verify import verify_dir
    report = verify_dir(gguf_file)
    assert report.ok and report.tensors == 2 * 9 + 3, report.problems  # 9 a layer, embedding, norm, lm_head
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[:-1000])
    assert verify_dir(truncated).problems[0].startswith(f"{truncated}: not a Llama GGUF quantkit can read")
    blocks = bytearray(gguf_file.read_bytes())
    reader = gguf.GGUFReader(gguf_file)
    q = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    blocks[q.data_offset:q.data_offset + 2] = np.array([np.nan], dtype=np.float16).tobytes()  # a block's d
    nan = tmp_path / "nan.gguf"
    nan.write_bytes(bytes(blocks))
    assert verify_dir(nan).problems == [f"{nan}: tensor blk.1.ffn_down.weight has values that are not finite once "
                                        f"decoded (NaN or Inf scales)"]


def test_verify_names_a_missing_tensor(tmp_path):
    from quantkit.formats.gguf import add_llama
    from quantkit.formats.verify import verify_dir
    from tests.conftest import tiny_config
    config = tiny_config(num_hidden_layers=1)
    writer = gguf.GGUFWriter(tmp_path / "p.gguf", "llama")
    add_llama(writer, config, 1)
    writer.add_tensor("token_embd.weight", np.zeros((config.vocab_size, config.hidden_size), dtype=np.float16))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((config.hidden_size, 7), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    problems = verify_dir(tmp_path / "p.gguf").problems
    assert f"{tmp_path / 'p.gguf'}: tensor output_norm.weight is missing" in problems
    assert f"{tmp_path / 'p.gguf'}: tensor blk.0.attn_q.weight has shape [64, 7], the config calls for [64, 64]" \
        in problems


def test_the_verify_command_takes_a_gguf(gguf_file, tmp_path):
    from tests.helpers import run
    result = run("verify", gguf_file)
    assert result.exit_code == 0 and result.output.strip().endswith("21 tensors verified"), result.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    result = run("verify", bad)
    assert result.exit_code == 1 and "not a Llama GGUF quantkit can read" in result.output


@pytest.mark.parametrize("bits", [4, 8])
def test_quantkit_loads_its_gguf_with_the_same_quantized_linears(tmp_path, bits):
    """Q4_0 / Q8_0 come back as AffineLinear modules with the file's integers and scales: the same logits."""
    import quantkit
    from quantkit.backends.rtn import RTNConfig
    from quantkit.quant.linear import AffineLinear
    from tests.conftest import DEMO_MODEL, random_model, tiny_config
    config = RTNConfig(bits=bits, group_size=32, symmetric=True)
    model = quantkit.quantize(random_model(tiny_config(num_key_value_heads=2)).half(), config)
    path = write_gguf(model, tmp_path / "m.gguf", DEMO_MODEL, recipe={"default": config.to_dict()})
    loaded = quantkit.load(path)
    ours = {n: m for n, m in model.named_modules() if isinstance(m, AffineLinear)}
    theirs = {n: m for n, m in loaded.named_modules() if isinstance(m, AffineLinear)}
    assert set(theirs) == set(ours) and len(ours) == 14
    for name, m in ours.items():
        a, b = m.affine_weight(), theirs[name].affine_weight()
        assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero), name
        assert theirs[name].quant_record.config == config
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_a_q4_1_gguf_loads_as_its_decoded_weights(tmp_path):
    import quantkit
    from quantkit.backends.rtn import RTNConfig
    from quantkit.quant.linear import AffineLinear
    from tests.conftest import random_model, tiny_config
    model = quantkit.quantize(random_model(tiny_config()).half(), RTNConfig(bits=4, group_size=32, symmetric=False))
    path = write_gguf(model, tmp_path / "m.gguf")
    loaded = quantkit.load(path, dtype="fp32")
    _, tensors = read_gguf(path)
    assert not any(isinstance(m, AffineLinear) for m in loaded.modules())
    for name, p in loaded.named_parameters():
        assert torch.equal(p, tensors[name]), name
