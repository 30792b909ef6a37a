"""The exceptions a user sees as one line rather than a traceback.

The CLI prints a ``ConfigError`` as a single line and exits with code 2; the
library raises it wherever a value a user typed (a device spec, a path, a
size) cannot be used, and its message names that value. A ``TrainingError``
is a run that cannot go on (the loss became non-finite): one line, exit 1.
"""


class ConfigError(ValueError):
    """A user-supplied value is invalid; the message names it."""


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""
