"""The `quantkit` command's entry point: imports the command line (torch, seconds) inside a Ctrl-C guard.

`import quantkit` imports no torch, so a Ctrl-C while the command starts is one line and exit 130, like
one during the work (quantkit.cli handles those), instead of a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


def main() -> None:
    try:
        cli_main = command_line()
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted (Ctrl-C) while quantkit was starting; nothing was written\n")
        sys.exit(INTERRUPTED)
    cli_main()


def command_line():
    """The whole command line: quantkit.cli's group with the planner's `plan` (which ranks above the CLI) added."""
    from quantkit.cli import main as group
    from quantkit.plan.command import plan

    group.add_command(plan)
    return group
