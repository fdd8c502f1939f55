"""The single exception type lowbit raises for user-facing problems."""


class LowbitError(ValueError):
    """Raised for bad input: wrong bits, bad calibration data, unknown names, bad artifacts."""
