"""The `quantkit` command's entry point: imports the command line (torch, seconds) inside a Ctrl-C guard.

`import quantkit` imports no torch, so a Ctrl-C while the command starts is one line and exit 130, like
one during the work (quantkit.cli handles those), instead of a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


def main() -> None:
    try:
        from quantkit.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted (Ctrl-C) while quantkit was starting; nothing was written\n")
        sys.exit(INTERRUPTED)
    cli_main()
