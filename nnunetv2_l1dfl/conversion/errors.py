"""The error every conversion step raises for a case (or a run) it cannot convert."""


class ConversionError(RuntimeError):
    """A case (or the whole run) cannot be converted; the message says which and why."""


class OutputError(ConversionError):
    """Writing into the dataset failed (disk full, read-only, a file that does not read back as
    written): no later case could be written either, so the run stops at the first one."""
