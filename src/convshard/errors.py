"""The one exception type for bad user input.

The CLI prints a ``ConfigError`` as a single line and exits with code 2; the
library raises it wherever a value a user typed (a device spec, a path, a
size) cannot be used, and its message names that value.
"""


class ConfigError(ValueError):
    """A user-supplied value is invalid; the message names it."""
