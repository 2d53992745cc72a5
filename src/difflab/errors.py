"""User-facing errors: one line that names the problem and the fix."""


def one_line(message: str) -> str:
    """``message`` with every line break escaped (a user's key or path may hold one, even \\x1e)."""
    return "".join(c if c.splitlines() == [c] else ascii(c)[1:-1] for c in message)


class DifflabError(ValueError):
    """Bad input (path, shape, dtype, value, config), its message always one line (line breaks in what the user
    gave are escaped). The CLI prints it and exits with status 2."""

    def __init__(self, message: str = "") -> None:
        super().__init__(one_line(str(message)))


def require(condition: bool, message: str) -> None:
    """Raise :class:`DifflabError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise DifflabError(message)


def closest(name: str, options) -> str | None:
    """The one of ``options`` closest to a misspelt ``name`` (difflib, cutoff 0.6), or None if none is close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return close[0] if close else None


def suggest(name: str, options) -> str:
    """A did-you-mean hint for a misspelt ``name``: `` (did you mean 'x'?)`` with the closest of ``options``, or ''."""
    close = closest(name, options)
    return f" (did you mean {close!r}?)" if close is not None else ""


def short(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name if empty), at most ``limit`` characters."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
