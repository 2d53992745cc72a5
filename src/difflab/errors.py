"""User-facing errors: one line that names the problem and the fix."""


class DifflabError(ValueError):
    """Bad input (path, shape, dtype, value, config). The CLI prints it as one line and exits with status 2."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`DifflabError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise DifflabError(message)
