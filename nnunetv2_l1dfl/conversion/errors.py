"""The error every conversion step raises for a case (or a run) it cannot convert."""


class ConversionError(RuntimeError):
    """A case (or the whole run) cannot be converted; the message says which and why."""
