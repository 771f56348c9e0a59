"""Calibration sources: hub recipes (offline), local files through datasets, token tensors, and their errors."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

import quantkit
from quantkit.calibrate import KNOWN_DATASETS, calibration_tokens, load_text
from quantkit.errors import QuantkitError

# Demo-corpus paragraphs: real English text, small enough to tokenize in milliseconds.
TRAIN_TXT = Path(__file__).resolve().parents[2] / "demo" / "model" / "train.txt"
PARAGRAPHS = [p for p in TRAIN_TXT.read_text(encoding="utf-8")[:40_000].split("\n\n") if p.strip()][:40]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network and no ~/.cache: the hub is offline, datasets' cache and quantkit's live in tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "quantkit-cache"))


@pytest.fixture(scope="module")
def tok(tokenizer_file):
    return quantkit.load_tokenizer(tokenizer_file)


# ---- writers for each local format --------------------------------------------------------------


def write_txt(path, docs, field="text"):
    path = path.with_suffix(".txt")
    path.write_text("\n\n".join(docs), encoding="utf-8")  # one document: the joined text
    return path


def write_jsonl(path, docs, field="text"):
    path = path.with_suffix(".jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({field: doc, "id": i}) + "\n")
    return path


def write_parquet(path, docs, field="text"):
    path = path.with_suffix(".parquet")
    pq.write_table(pa.table({field: pa.array(docs, pa.string()), "id": pa.array(range(len(docs)), pa.int64())}), path)
    return path


def write_csv(path, docs, field="text"):
    path = path.with_suffix(".csv")
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([field, "id"])
        writer.writerows([doc, i] for i, doc in enumerate(docs))
    return path


def write_disk(path, docs, field="text"):
    datasets.Dataset.from_dict({field: docs, "id": list(range(len(docs)))}).save_to_disk(str(path))
    return path


WRITERS = {"txt": write_txt, "jsonl": write_jsonl, "parquet": write_parquet, "csv": write_csv, "disk": write_disk}
ROW_WRITERS = {k: v for k, v in WRITERS.items() if k != "txt"}


# ---- local text sources -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ROW_WRITERS)
def test_row_formats_give_their_documents(tmp_path, kind):
    path = ROW_WRITERS[kind](tmp_path / "calib", PARAGRAPHS)
    assert load_text(path) == PARAGRAPHS
    assert load_text(str(path)) == PARAGRAPHS


def test_txt_is_one_document(tmp_path):
    path = write_txt(tmp_path / "calib", PARAGRAPHS)
    assert load_text(path) == ["\n\n".join(PARAGRAPHS)]


@pytest.mark.parametrize("kind", ROW_WRITERS)
def test_text_field_is_configurable(tmp_path, kind):
    path = ROW_WRITERS[kind](tmp_path / "calib", PARAGRAPHS[:5], field="content")
    assert load_text(path, text_field="content") == PARAGRAPHS[:5]


def test_list_of_strings():
    assert load_text(PARAGRAPHS[:3]) == PARAGRAPHS[:3]
    assert load_text(tuple(PARAGRAPHS[:3])) == PARAGRAPHS[:3]


def test_datasetdict_on_disk_uses_train(tmp_path):
    train = datasets.Dataset.from_dict({"text": PARAGRAPHS[:3]})
    test = datasets.Dataset.from_dict({"text": PARAGRAPHS[3:5]})
    datasets.DatasetDict({"test": test, "train": train}).save_to_disk(str(tmp_path / "dd"))
    assert load_text(tmp_path / "dd") == PARAGRAPHS[:3]
    datasets.DatasetDict({"test": test, "validation": test}).save_to_disk(str(tmp_path / "no-train"))
    with pytest.raises(QuantkitError, match="splits test, validation and none of train"):
        load_text(tmp_path / "no-train")


def test_null_rows_are_empty_documents_with_a_warning(tmp_path, caplog):
    path = tmp_path / "nulls.jsonl"
    path.write_text('{"text": "a b c"}\n{"text": null}\n{"text": "d e"}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        assert load_text(path) == ["a b c", "", "d e"]
    assert "1 of 3 rows" in caplog.text


def test_every_format_gives_the_same_tokens(tmp_path, tok):
    """The same documents as .txt (joined by hand), .jsonl, .parquet, .csv, a save_to_disk directory and a list
    are the same text once joined with "\\n\\n": same seed, same tensor."""
    expected = calibration_tokens(PARAGRAPHS, tok, n_samples=8, seq_len=64, cache_dir=tmp_path / "c")
    for kind, write in WRITERS.items():
        got = calibration_tokens(write(tmp_path / f"calib-{kind}", PARAGRAPHS), tok, n_samples=8, seq_len=64,
                                 cache_dir=tmp_path / "c")
        assert torch.equal(got, expected), kind


# ---- hub datasets: the GPTQ recipes, and the offline failure ------------------------------------


def test_known_datasets_are_gptqs_recipes():
    """IST-DASLab/gptq datautils.py: get_wikitext2, get_ptb, get_ptb_new, get_c4 (train splits)."""
    wiki, ptb, ptb_new, c4 = (KNOWN_DATASETS[k] for k in ("wikitext2", "ptb", "ptb-new", "c4"))
    assert (wiki.path, wiki.config, wiki.split, wiki.field, wiki.joiner, wiki.mode) == \
        ("wikitext", "wikitext-2-raw-v1", "train", "text", "\n\n", "random")
    assert (ptb.path, ptb.config, ptb.split, ptb.field, ptb.joiner, ptb.mode) == \
        ("ptb_text_only", "penn_treebank", "train", "sentence", "\n\n", "random")
    assert (ptb_new.path, ptb_new.config, ptb_new.field, ptb_new.joiner) == ("ptb_text_only", "penn_treebank", "sentence", " ")
    assert (c4.path, c4.data_files, c4.split, c4.field, c4.mode) == \
        ("allenai/c4", "en/c4-train.00000-of-01024.json.gz", "train", "text", "document")


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset answering for the hub from in-memory rows; records its arguments."""
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        field = "sentence" if path == "ptb_text_only" else "text"
        return datasets.Dataset.from_dict({field: PARAGRAPHS, "extra": ["x"] * len(PARAGRAPHS)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


@pytest.mark.parametrize("key", ["wikitext2", "ptb", "ptb-new"])
def test_hub_random_sources_join_like_gptq(fake_hub, tok, tmp_path, key):
    spec = KNOWN_DATASETS[key]
    assert load_text(key) == PARAGRAPHS
    got = calibration_tokens(key, tok, n_samples=4, seq_len=64, cache_dir=tmp_path)
    expected = calibration_tokens([spec.joiner.join(PARAGRAPHS)], tok, n_samples=4, seq_len=64, cache_dir=tmp_path)
    assert torch.equal(got, expected)
    assert fake_hub[0] == (spec.path, spec.config, {"split": "train"})


def test_hub_c4_samples_documents(fake_hub, tok, tmp_path):
    got = calibration_tokens("c4", tok, n_samples=4, seq_len=32, cache_dir=tmp_path)  # mode None: c4's "document"
    assert fake_hub[0] == ("allenai/c4", None, {"split": "train",
                                                "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}})
    docs = [torch.tensor(tok.encode(p, bos=True)) for p in PARAGRAPHS]
    for row in got:
        assert any(len(d) >= 32 and (d.unfold(0, 32, 1) == row).all(1).any() for d in docs)


@pytest.mark.parametrize("key", sorted(KNOWN_DATASETS))
def test_unreachable_hub_fails_fast_and_points_to_local_files(key, tok, tmp_path):
    start = time.perf_counter()
    with pytest.raises(QuantkitError) as info:
        calibration_tokens(key, tok, cache_dir=tmp_path)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert f"calibration source {key} needs the Hugging Face hub, which is unreachable (" in message
    assert "pass a local file instead, e.g. --calib path/to/text.txt" in message
    assert "\n" not in message
    with pytest.raises(QuantkitError, match="unreachable"):
        load_text(key)


# ---- errors -------------------------------------------------------------------------------------


def _empty_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n \t\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "header.csv").write_text("text,id\n")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "zero.parquet")
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})) \
        .save_to_disk(str(tmp_path / "zero-rows"))
    return {"empty.txt": tmp_path / "empty.txt", "blank.txt": tmp_path / "blank.txt",
            "empty.jsonl": tmp_path / "empty.jsonl", "blank.jsonl": tmp_path / "blank.jsonl",
            "header.csv": tmp_path / "header.csv", "zero.parquet": tmp_path / "zero.parquet",
            "zero-rows dir": tmp_path / "zero-rows", "[]": [], "blank strings": ["", "  ", "\n"],
            "empty tensor": torch.zeros(0, 16, dtype=torch.long)}


@pytest.mark.parametrize("case", ["empty.txt", "blank.txt", "empty.jsonl", "blank.jsonl", "header.csv",
                                  "zero.parquet", "zero-rows dir", "[]", "blank strings", "empty tensor"])
def test_empty_source(tmp_path, tok, case):
    source = _empty_sources(tmp_path)[case]
    with pytest.raises(QuantkitError, match=r"is empty|no text"):
        calibration_tokens(source, tok, n_samples=1, seq_len=16, cache_dir=tmp_path / "c")


@pytest.mark.parametrize("kind", ROW_WRITERS)
def test_missing_text_field_lists_the_fields(tmp_path, kind):
    path = ROW_WRITERS[kind](tmp_path / "calib", PARAGRAPHS[:3], field="body")
    with pytest.raises(QuantkitError, match=r"no text field 'text'; its fields are body, id: pass --calib-field \(text_field= in Python\)"):
        load_text(path)


def test_non_text_field(tmp_path):
    path = write_jsonl(tmp_path / "calib", PARAGRAPHS[:3])
    with pytest.raises(QuantkitError, match=r"field 'id' holds .*int64.*, not text"):
        load_text(path, text_field="id")


def test_unknown_source_string(tok):
    with pytest.raises(QuantkitError, match=r"'wikitext-3' is neither a known dataset \(wikitext2, ptb, ptb-new, c4\) "
                                            r"nor an existing file or directory"):
        calibration_tokens("wikitext-3", tok)


def test_unsupported_file_type_and_object(tmp_path, tok):
    (tmp_path / "calib.xml").write_text("<text>hello</text>")
    with pytest.raises(QuantkitError, match=r"unsupported calibration source file type '.xml'"):
        load_text(tmp_path / "calib.xml")
    with pytest.raises(QuantkitError, match=r"type dict is not supported"):
        load_text({"text": "hello"})
    with pytest.raises(QuantkitError, match=r"item 1 is a int, not a string"):
        load_text(["hello", 3])
    (tmp_path / "not-a-dataset").mkdir()
    with pytest.raises(QuantkitError, match=r"not one written by datasets' save_to_disk"):
        load_text(tmp_path / "not-a-dataset")


def test_malformed_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops\n', encoding="utf-8")
    with pytest.raises(QuantkitError, match=r"bad.jsonl: not readable as json"):
        load_text(path)


def test_token_files_are_not_text(tmp_path):
    torch.save(torch.zeros(2, 4, dtype=torch.long), tmp_path / "ids.pt")
    with pytest.raises(QuantkitError, match=r"holds token ids, not text"):
        load_text(tmp_path / "ids.pt")
    with pytest.raises(QuantkitError, match=r"token tensor is not text"):
        load_text(torch.zeros(2, 4, dtype=torch.long))


# ---- token sources ------------------------------------------------------------------------------


def _ids(n=6, seq_len=16, seed=0):
    return torch.randint(3, 4096, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def test_token_tensor_and_files(tmp_path, tok):
    ids = _ids()
    torch.save(ids, tmp_path / "bare.pt")
    torch.save({"input_ids": ids.int()}, tmp_path / "dict.pt")
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    for source in (ids, tmp_path / "bare.pt", str(tmp_path / "dict.pt"), tmp_path / "ids.safetensors"):
        got = calibration_tokens(source, tok, n_samples=4, seq_len=16)
        assert got.dtype == torch.long and torch.equal(got, ids[:4]), source
    got = calibration_tokens(ids, tok, n_samples=6, seq_len=16)
    got[0, 0] = 0
    assert ids[0, 0] != 0, "the caller's tensor must not be aliased"


@pytest.mark.parametrize("bad, pattern", [
    (torch.arange(16), r"must be 2-D \[n_samples, seq_len\], got shape \(16,\)"),
    (torch.zeros(2, 3, 16, dtype=torch.long), r"must be 2-D .* got shape \(2, 3, 16\)"),
    (torch.zeros(4, 16), r"must be integers, got torch.float32"),
    (torch.zeros(4, 16, dtype=torch.bool), r"must be integers, got torch.bool"),
    (torch.full((4, 16), 4096), r"token id 4096 is outside the tokenizer's vocabulary \[0, 4096\)"),
    (torch.full((4, 16), -1), r"token id -1 is outside"),
])
def test_bad_token_tensor(tok, bad, pattern):
    with pytest.raises(QuantkitError, match=pattern):
        calibration_tokens(bad, tok, n_samples=2, seq_len=16)


def test_token_tensor_shape_must_match(tok):
    with pytest.raises(QuantkitError, match=r"windows of 16 tokens, but --seq-len 32: pass --seq-len 16"):
        calibration_tokens(_ids(), tok, n_samples=2, seq_len=32)
    with pytest.raises(QuantkitError, match=r"6 windows, fewer than --n-samples 8"):
        calibration_tokens(_ids(), tok, n_samples=8, seq_len=16)


def test_token_files_with_several_tensors(tmp_path, tok):
    torch.save({"input_ids": _ids(), "attention_mask": torch.ones(6, 16)}, tmp_path / "two.pt")
    save_file({"input_ids": _ids(), "labels": _ids(seed=1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(QuantkitError, match=r"two.pt: holds 2 entries \(input_ids \(6, 16\), attention_mask \(6, 16\)\), "
                                            r"not exactly one"):
        calibration_tokens(tmp_path / "two.pt", tok, n_samples=2, seq_len=16)
    with pytest.raises(QuantkitError, match=r"two.safetensors: holds 2 entries .*input_ids.*labels.*not exactly one"):
        calibration_tokens(tmp_path / "two.safetensors", tok, n_samples=2, seq_len=16)


def test_unreadable_token_files(tmp_path, tok):
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(QuantkitError, match=r"junk.pt: not a torch file"):
        calibration_tokens(tmp_path / "junk.pt", tok, n_samples=1, seq_len=16)
    with pytest.raises(QuantkitError, match=r"junk.safetensors: not a readable safetensors file"):
        calibration_tokens(tmp_path / "junk.safetensors", tok, n_samples=1, seq_len=16)


def test_script_dataset_refused_by_datasets_is_a_clear_error(monkeypatch, tokenizer_file):
    def refuse(*args, **kwargs):
        raise RuntimeError("Dataset scripts are no longer supported, but found ptb_text_only.py")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(QuantkitError, match="calibration source ptb .*script dataset.*pass that instead"):
        calibration_tokens("ptb", quantkit.load_tokenizer(tokenizer_file.parent), n_samples=2, seq_len=16)
