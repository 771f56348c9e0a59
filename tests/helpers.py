"""Helpers shared by the test modules (which never import one another): the command line in-process, and what a
one-line error looks like."""

from __future__ import annotations

import re
from types import SimpleNamespace

from click.testing import CliRunner

from quantkit.entry import command_line

PROGRESS = re.compile(r"\d+/\d+ \[")  # a tqdm bar: '... 3/15 [00:01<00:04, ...]'


def run(*args):
    """`quantkit ARGS` in-process (every command, `plan` included; stderr is mixed into `.output`). `.lines`: the
    output's non-empty lines without tqdm's progress bars."""
    result = CliRunner().invoke(command_line(), [str(a) for a in args])
    result.lines = [line for line in re.split(r"[\r\n]", result.output) if line.strip() and not PROGRESS.search(line)]
    return result


def without_progress(result):
    """The result with tqdm's progress bars (stderr, closed before the error) taken out of its output."""
    lines = [line for line in re.split(r"[\r\n]", result.output) if line.strip() and not PROGRESS.search(line)]
    return SimpleNamespace(exit_code=result.exit_code, output="\n".join(lines))


def assert_one_line_error(result, *needles):
    """Exit 1 and an output of exactly one line, `Error: ...`, holding every needle."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


def one_line_error(result, *needles) -> str:
    """Exit 1 and exactly one `Error: ...` line holding every needle, among other output (warnings), no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return lines[0]
