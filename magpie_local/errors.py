"""The one base class of magpie-local's errors: anything raised as a MagpieError is a user-facing
problem (bad input, a model or database that cannot be used) with a one-line message."""


class MagpieError(Exception):
    """A user-facing error: the CLI prints it as one line and exits 2."""


class UsageError(MagpieError, ValueError):
    """Options or arguments that do not fit together or are out of range."""


class ConvertError(MagpieError, ValueError):
    """A model cannot be converted (to another GGUF weight type, or to an mlx-lm directory)."""
