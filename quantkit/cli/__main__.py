"""`python -m quantkit.cli`: the `quantkit` command (as `python -m quantkit`)."""

from quantkit.entry import main

main()
