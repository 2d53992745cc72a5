"""User-facing errors: one line that names the problem and the fix."""


class DifflabError(ValueError):
    """Bad input (path, shape, dtype, value, config). The CLI prints it as one line and exits with status 2."""


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
