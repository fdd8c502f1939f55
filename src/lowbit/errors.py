"""The single exception type lowbit raises for user-facing problems."""


class LowbitError(ValueError):
    """Raised for bad input: wrong bits, bad calibration data, unknown names, bad artifacts."""


class LowbitFileError(LowbitError, OSError):
    """A file lowbit was asked to write could not be written (a LowbitError that is also an OSError,
    so that callers catching either see it)."""
