"""sdzero's own refusals: input, settings or run state that sdzero will not work with.

The command line prints a refusal as one line and exits 2; any other exception is a bug (ours or a
library's) and keeps its traceback. `SDZERO_DEBUG=1` shows the traceback of a refusal too. Each class
also derives from the built-in error a caller would expect, so `except ValueError` still catches
bad settings.
"""


class Refusal(ValueError):
    """Bad input or settings: the message says what is wrong and where."""


class MissingFile(Refusal, FileNotFoundError):
    """A file or folder the command needs is not there."""


class Diverged(Refusal, FloatingPointError):
    """Training produced a loss or weights that are not finite."""
