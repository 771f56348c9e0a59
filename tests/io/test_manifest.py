"""quantkit_manifest.json: written last by every directory writer, read back and checked file by file."""

from __future__ import annotations

import hashlib
import json

import pytest

import quantkit
from quantkit.errors import QuantkitError
from quantkit.io.manifest import (MANIFEST_FILE, check_intact, manifest_problems, read_manifest, sha256_file,
                               write_manifest)


def make_dir(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.json").write_text('{"x": 1}\n')
    (d / "sub" / "b.safetensors").write_bytes(bytes(range(256)) * 5)
    (d / ".DS_Store").write_bytes(b"os junk")
    return d


def test_manifest_lists_every_file_but_itself_and_hidden_ones_with_size_and_sha256(tmp_path):
    d = make_dir(tmp_path)
    write_manifest(d)
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    assert manifest["format"] == "quantkit-manifest" and manifest["version"] == 1
    assert list(manifest["files"]) == ["a.json", "sub/b.safetensors"]
    entry = manifest["files"]["sub/b.safetensors"]
    assert entry == {"size": 1280, "sha256": hashlib.sha256(bytes(range(256)) * 5).hexdigest()}
    assert read_manifest(d) == manifest["files"]
    assert manifest_problems(d) == []
    write_manifest(d)  # rewriting it does not list the old manifest
    assert list(read_manifest(d)) == ["a.json", "sub/b.safetensors"]


def test_sha256_file_streams_files_larger_than_a_chunk(tmp_path, monkeypatch):
    import quantkit.io.manifest as manifest

    monkeypatch.setattr(manifest, "CHUNK", 7)
    data = bytes(range(200)) * 3
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "a.json").write_text('{"x": 2}\n'), "a.json: sha256 differs"),
    (lambda d: (d / "sub" / "b.safetensors").write_bytes(b"short"), "b.safetensors: 5 bytes, but"),
    (lambda d: (d / "extra.bin").write_bytes(b"x"), "extra.bin: not listed in quantkit_manifest.json"),
], ids=["changed", "truncated", "unlisted"])
def test_every_difference_is_one_line_naming_the_file(tmp_path, damage, expected):
    d = make_dir(tmp_path)
    write_manifest(d)
    damage(d)
    (problem,) = [message for _, message in manifest_problems(d)]
    assert expected in problem and str(d) in problem and "\n" not in problem
    with pytest.raises(QuantkitError, match=expected):
        check_intact(d)


def test_a_deleted_file_is_reported_but_left_to_the_loaders(tmp_path):
    d = make_dir(tmp_path)
    write_manifest(d)
    (d / "a.json").unlink()
    (problem,) = [message for _, message in manifest_problems(d)]
    assert problem == f"{d / 'a.json'}: listed in {MANIFEST_FILE} but missing: the file is damaged or was changed " \
                      f"after quantkit wrote it: copy or quantize it again (changed on purpose? then delete {MANIFEST_FILE})"
    check_intact(d)  # a missing shard or config.json is the loaders' one-line error


def test_several_problems_are_all_reported(tmp_path):
    d = make_dir(tmp_path)
    write_manifest(d)
    (d / "a.json").write_text("changed")
    (d / "sub" / "b.safetensors").write_bytes(b"")
    assert len(manifest_problems(d)) == 2
    with pytest.raises(QuantkitError, match=r"\(1 more: run quantkit verify"):
        check_intact(d)


def test_sizes_only_misses_a_same_size_change_and_hashes_catch_it(tmp_path):
    d = make_dir(tmp_path)
    write_manifest(d)
    (d / "a.json").write_text('{"x": 9}\n')
    assert manifest_problems(d, hashes=False) == []
    assert len(manifest_problems(d, hashes=True)) == 1


def test_load_ignores_an_added_readme_but_not_an_added_weights_file(tmp_path):
    d = make_dir(tmp_path)
    write_manifest(d)
    (d / "README.md").write_text("notes")
    check_intact(d)  # nothing quantkit reads
    (d / "model.safetensors").write_bytes(b"x")
    with pytest.raises(QuantkitError, match="model.safetensors: not listed"):
        check_intact(d)


def test_no_manifest_is_nothing_to_check(tmp_path):
    d = make_dir(tmp_path)
    assert read_manifest(d) is None and manifest_problems(d) == []
    check_intact(d)


@pytest.mark.parametrize("text", ["not json", "[]", '{"format": "other", "version": 1, "files": {}}',
                                  '{"format": "quantkit-manifest", "version": 1, "files": {"../x": {"size": 1, '
                                  '"sha256": "0"}}}',
                                  '{"format": "quantkit-manifest", "version": 1, "files": {"a": {"size": "1"}}}'])
def test_a_malformed_manifest_is_one_line_naming_it(tmp_path, text):
    d = make_dir(tmp_path)
    (d / MANIFEST_FILE).write_text(text)
    with pytest.raises(QuantkitError, match=MANIFEST_FILE) as e:
        read_manifest(d)
    assert "\n" not in str(e.value)


def test_save_model_writes_a_manifest_that_matches(tiny_model_dir):
    files = read_manifest(tiny_model_dir)
    assert set(files) == {p.name for p in tiny_model_dir.iterdir()} - {MANIFEST_FILE}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(files)
    assert manifest_problems(tiny_model_dir) == []


def test_dense_load_refuses_a_changed_file(tiny_model_dir):
    quantkit.load(tiny_model_dir)
    text = (tiny_model_dir / "config.json").read_text()
    assert '"rope_theta": 10000.0' in text
    (tiny_model_dir / "config.json").write_text(text.replace('"rope_theta": 10000.0', '"rope_theta": 20000.0'))
    with pytest.raises(QuantkitError, match=r"config\.json: sha256 differs from quantkit_manifest\.json"):
        quantkit.load(tiny_model_dir)
