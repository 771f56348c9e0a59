"""The one exception type for user errors.

Library code raises `QuantkitError` with a one-line message that names the file, tensor or
option at fault and says how to fix it; the CLI turns it into a `click.ClickException`.
"""


class QuantkitError(ValueError):
    """A user-facing error: bad input, a missing file, an unusable option."""
