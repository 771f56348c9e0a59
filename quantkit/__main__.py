"""`python -m quantkit`: the `quantkit` command."""

from quantkit.entry import main

main()
