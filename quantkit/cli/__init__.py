"""Layer 6, the command line: flags -> option objects -> library calls. `main.py` is the group, `options.py` the
options several commands share, one module per command family (quantize, evaluate, model). Imports every layer
below it; `quantkit plan` ranks above it (quantkit/plan/command.py, added by quantkit.entry)."""

from quantkit.cli.main import main

__all__ = ["main"]
