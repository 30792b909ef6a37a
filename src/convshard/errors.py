"""The exceptions a user sees as one line rather than a traceback.

The CLI prints a ``ConfigError`` as a single line and exits with code 2; the
library raises it wherever a value a user typed (a device spec, a path, a
size) cannot be used, and its message names that value. A ``TrainingError``
is a run that cannot go on (the loss became non-finite): one line, exit 1,
or its ``exit_code`` (143 for a run a SIGTERM stopped after saving).
"""


class ConfigError(ValueError):
    """A user-supplied value is invalid; the message names it."""


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self) -> tuple:  # pickled between ranks and processes with its exit code
        return _training_error, (str(self), self.exit_code, type(self))


def _training_error(message: str, exit_code: int, kind: type = TrainingError) -> TrainingError:
    return kind(message, exit_code=exit_code) if kind is TrainingError else kind(message)
