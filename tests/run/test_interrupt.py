"""A real `quantkit quantize` process stopped in the middle of layer k by SIGKILL, SIGINT or SIGTERM leaves no
OUT, keeps the finished layers (unless --no-keep-work), says so in one line, and `--resume` then writes an
output byte-identical to an uninterrupted run's."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from quantkit.run.workdir import work_dir_of
from tests.helpers import LAYERS, digests, method_args, run

pytestmark = pytest.mark.slow  # real subprocesses stopped and resumed: `make test-fast` leaves it out

# The child is the CLI with one change: in the middle of layer K's work unit (3 tensors written) it says so and
# sleeps, so the test's signal lands there however loaded the machine is.
STOP_IN_LAYER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from quantkit.io.shards import ShardWriter
    ready, k = Path(sys.argv[1]), int(sys.argv[2])
    real, seen = ShardWriter.add, []
    def add(self, name, tensor):
        real(self, name, tensor)
        if self.out_dir.parent.name.endswith(".quantkit-work") and name.startswith(f"model.layers.{k}."):
            seen.append(name)
            if len(seen) == 3:
                ready.touch()
                time.sleep(120)
    ShardWriter.add = add
    from quantkit.cli import main
    sys.argv = ["quantkit", *sys.argv[3:]]
    main()
""")
K = 2
EXIT = {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130, signal.SIGTERM: 143}
WHAT = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "terminated by SIGTERM"}


def stop_in_layer(tmp_path, sig, args) -> tuple[int, str]:
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", STOP_IN_LAYER, str(ready), str(K), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached layer K"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.parametrize("method, sig, keep", [("int4", signal.SIGKILL, True), ("gptq", signal.SIGKILL, True),
                                               ("int4", signal.SIGINT, True), ("gptq", signal.SIGTERM, True),
                                               ("int4", signal.SIGTERM, False)])
def test_stopped_in_layer_k_then_resumed(src, tokens, tmp_path, method, sig, keep):  # noqa: F811
    args = method_args(method, tokens)
    out = tmp_path / "q"
    code, err = stop_in_layer(tmp_path, sig, ["quantize", src, *args, "-o", out,
                                              *([] if keep else ["--no-keep-work"])])
    assert code == EXIT[sig], err
    assert not out.exists() and "Traceback" not in err
    beside = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".q."))
    assert beside == ([".q.quantkit-work"] if keep else []), "nothing but the work directory is left beside OUT"
    if sig != signal.SIGKILL:
        last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
        if keep:
            assert last.startswith(f"Error: {out}: {WHAT[sig]} after {K} of {LAYERS} layers: --resume continues "
                                   f"(the work directory {work_dir_of(out)} holds "), last
        else:
            assert last == (f"Error: {out}: {WHAT[sig]} after {K} of {LAYERS} layers; the work directory was "
                            f"removed (--no-keep-work)"), last
        assert [line for line in err.splitlines() if line.startswith("Error")] == [last]
    if not keep:
        return
    assert run("quantize", src, *args, "-o", tmp_path / "ref").exit_code == 0
    resumed = subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", *map(str, args), str(src), "-o",
                              str(out), "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after {K} of {LAYERS} layers done" in resumed.stderr
    assert digests(out) == digests(tmp_path / "ref")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".q.")) == []


# Ctrl-C lands while `import torch` runs: the child sends itself SIGINT from the import hook.
CTRL_C_IN_IMPORTS = textwrap.dedent("""
    import builtins, os, signal, sys
    real = builtins.__import__
    def hooked(name, *args, **kwargs):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)
        return real(name, *args, **kwargs)
    builtins.__import__ = hooked
    from quantkit.entry import main
    sys.argv = ["quantkit", "backends"]
    main()
""")


def test_ctrl_c_while_the_command_starts_is_one_line():
    """The console script's entry point (quantkit.entry) imports torch inside a Ctrl-C guard."""
    proc = subprocess.run([sys.executable, "-c", CTRL_C_IN_IMPORTS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == ["Error: interrupted (Ctrl-C) while quantkit was starting; "
                                                "nothing was written"]
