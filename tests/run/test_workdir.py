"""Resumable quantization (quantkit.run.workdir): a run stopped after k layers keeps them in the work directory,
--resume finishes it byte for byte as an uninterrupted run, and a resume that would not be is refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.run.workdir import WorkDir, work_dir_of
from tests.helpers import LAYERS, METHODS, assert_one_line_error, digests, method_args, run


def stop_after(monkeypatch, k: int, error: BaseException):
    """The run raises `error` right after its k-th layer is recorded in the work directory."""
    real = WorkDir.finish_layer

    def finish_layer(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.done == k:
            raise error

    monkeypatch.setattr(WorkDir, "finish_layer", finish_layer)


@pytest.mark.parametrize("method", list(METHODS))
def test_interrupted_then_resumed_is_byte_identical(src, tokens, tmp_path, monkeypatch, method):
    args = method_args(method, tokens)
    assert run("quantize", src, *args, "-o", tmp_path / "ref").exit_code == 0
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        stop_after(m, 3, KeyboardInterrupt())
        stopped = run("quantize", src, *args, "-o", out)
    assert stopped.exit_code == 130 and "Traceback" not in stopped.output
    assert stopped.lines[-1].startswith(f"Error: {out}: interrupted (Ctrl-C) after 3 of {LAYERS} layers: --resume "
                                        f"continues (the work directory {work_dir_of(out)} holds ")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".q.")) == \
        [".q.quantkit-work"]
    resumed = run("quantize", src, *args, "-o", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert digests(out) == digests(tmp_path / "ref")
    assert not work_dir_of(out).exists()


def test_a_stale_work_directory_is_refused_without_resume_and_discarded_with_force(src, tmp_path, monkeypatch):
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        stop_after(m, 2, KeyboardInterrupt())
        run("quantize", src, *METHODS["int4"], "-o", out)
    result = run("quantize", src, *METHODS["int4"], "-o", out)
    assert_one_line_error(result, f"{out}: a previous run left .q.quantkit-work with 2 of {LAYERS} layers done (",
                          "pass --resume to continue it, or --force to start over")
    assert work_dir_of(out).is_dir()
    forced = run("quantize", src, *METHODS["int4"], "-o", out, "--force")
    assert forced.exit_code == 0 and out.is_dir() and not work_dir_of(out).exists()


def test_resume_without_a_previous_run_starts_normally(src, tmp_path, caplog):
    result = run("quantize", src, *METHODS["int4"], "-o", tmp_path / "q", "--resume")
    assert result.exit_code == 0 and (tmp_path / "q" / "config.json").is_file()
    assert "no previous run to continue" in caplog.text


@pytest.mark.parametrize("keep", [True, False])
def test_an_error_after_a_layer_keeps_the_work_unless_no_keep_work(src, tmp_path, monkeypatch, keep):
    out = tmp_path / "q"
    stop_after(monkeypatch, 2, RuntimeError("boom"))
    result = run("quantize", src, *METHODS["int4"], "-o", out, *([] if keep else ["--no-keep-work"]))
    assert isinstance(result.exception, RuntimeError) and not out.exists()
    assert work_dir_of(out).exists() == keep


def test_interrupted_before_any_layer_keeps_nothing(src, tmp_path, monkeypatch):
    out = tmp_path / "q"
    monkeypatch.setattr("quantkit.run.pipeline.quantize", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = run("quantize", src, *METHODS["int4"], "-o", out)
    assert result.exit_code == 130 and result.lines[-1] == \
        f"Error: {out}: interrupted (Ctrl-C) before any layer was finished; nothing was kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def change_recipe(src, tokens, args):
    at = args.index("--bits") + 1
    return src, args[:at] + (3,) + args[at + 1:]


def change_config(src, tokens, args):
    config = json.loads((src / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (src / "config.json").write_text(json.dumps(config))
    return src, args


def change_header(src, tokens, args):
    tensors = load_file(src / "model.safetensors")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt", "note": "re-saved"})
    return src, args


def change_data_in_place(src, tokens, args):
    """One bit flipped in the middle of the file, where the fingerprint's samples do not look: its mtime says so."""
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    return src, args


def change_calibration(src, tokens, args):
    torch.save(torch.load(tokens) + 1, tokens)
    return src, args


def change_threads(src, tokens, args):
    return src, args  # torch.get_num_threads is patched by the test


CHANGES = {"recipe": (change_recipe, "cannot --resume: the recipe changed"),
           "config.json": (change_config, "cannot --resume: the source's config.json changed"),
           "header": (change_header, "cannot --resume: the source's model.safetensors changed"),
           "data in place": (change_data_in_place, "cannot --resume: the source's model.safetensors changed "
                                                   "(modified since the run began)"),
           "calibration": (change_calibration, "cannot --resume: the calibration tokens changed"),
           "threads": (change_threads, "cannot --resume: torch now uses 7 threads where the previous run used ")}


@pytest.mark.parametrize("change", list(CHANGES))
def test_resume_refuses_what_changed(src, tokens, tmp_path, monkeypatch, change):
    args = method_args("gptq", tokens)
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        stop_after(m, 2, KeyboardInterrupt())
        run("quantize", src, *args, "-o", out)
    before = digests(work_dir_of(out))
    make, needle = CHANGES[change]
    src, args = make(src, tokens, args)
    if change == "threads":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    result = run("quantize", src, *args, "-o", out, "--resume")
    assert_one_line_error(result, f"{out}: {needle}", "--force instead of --resume to start over")
    if change == "threads":
        assert "set OMP_NUM_THREADS=" in result.lines[0] and "byte-identical" in result.lines[0]
    assert digests(work_dir_of(out)) == before  # a refused resume changes nothing


def test_a_killed_runs_temporaries_are_removed_a_live_ones_kept(src, tmp_path):
    out = tmp_path / "q"
    dead = tmp_path / ".q.quantkit-999999999-0badf00d.tmp"  # no such process
    live = tmp_path / f".q.quantkit-{os.getppid()}-0badf00d.tmp"
    for d in (dead, live):
        d.mkdir()
        (d / "part").write_bytes(b"half")
    assert run("quantize", src, *METHODS["int4"], "-o", out).exit_code == 0
    assert not dead.exists() and live.exists()


def test_a_work_directory_of_a_running_process_is_refused_even_with_force(src, tmp_path, monkeypatch):
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        stop_after(m, 1, KeyboardInterrupt())
        run("quantize", src, *METHODS["int4"], "-o", out)
    state_path = work_dir_of(out) / "state.json"
    state = json.loads(state_path.read_text())
    import psutil

    parent = psutil.Process(os.getppid())
    state["owner"] = {"pid": parent.pid, "started": parent.create_time()}
    state_path.write_text(json.dumps(state))
    for flag in ("--resume", "--force"):
        assert_one_line_error(run("quantize", src, *METHODS["int4"], "-o", out, flag),
                              f"{out}: another quantkit process (pid {parent.pid}) is writing it now")


def test_resume_of_a_complete_output_says_there_is_nothing_to_resume(src, tmp_path):
    out = tmp_path / "done"
    assert run("quantize", src, "--method", "int4", "--group-size", "32", "-o", out).exit_code == 0
    result = run("quantize", src, "--method", "int4", "--group-size", "32", "-o", out, "--resume")
    assert result.exit_code == 1 and "nothing to --resume" in result.output and "Traceback" not in result.output
