"""User-facing errors: one line that names the problem and the fix."""


def one_line(message: str) -> str:
    """``message`` with every line break escaped (a user's key or path may hold one, even \\x1e)."""
    return "".join(c if c.splitlines() == [c] else ascii(c)[1:-1] for c in message)


class DifflabError(ValueError):
    """Bad input (path, shape, dtype, value, config), its message always one line (line breaks in what the user
    gave are escaped). The CLI prints it and exits with status 2."""

    def __init__(self, message: str = "") -> None:
        super().__init__(one_line(str(message)))


class Interrupted(Exception):
    """Work stopped on purpose (SIGTERM or Ctrl-C) after saving what it had: it ends the command and is never
    retried (:class:`difflab.training.TrainingInterrupted` is one)."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`DifflabError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise DifflabError(message)


def edit_distance(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, or swap two neighbours) that turn ``a`` into ``b`` (optimal string
    alignment: 'dms' -> 'dsm' is one edit)."""
    prev2, prev = None, list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def closest(name: str, options) -> str | None:
    """The one of ``options`` closest to a misspelt ``name``, or None if none is close: the same letters in
    another case first, then the fewest edits (case ignored; a swap of two neighbours is one edit) when at most a
    third of the name's letters (at least one), ties and the rest decided by difflib's similarity (cutoff 0.6)."""
    import difflib

    name, opts = str(name), [str(o) for o in options]
    low = name.lower()
    for o in opts:
        if o.lower() == low:
            return o
    ratio = {o: difflib.SequenceMatcher(None, low, o.lower()).ratio() for o in opts}
    near = [o for o in opts if edit_distance(low, o.lower()) <= max(1, len(name) // 3)]
    if near:
        return min(near, key=lambda o: (edit_distance(low, o.lower()), -ratio[o]))
    best = max(opts, key=lambda o: ratio[o], default=None)
    return best if best is not None and ratio[best] >= 0.6 else None


def suggest(name: str, options) -> str:
    """A did-you-mean hint for a misspelt ``name``: `` (did you mean 'x'?)`` with the closest of ``options``, or ''."""
    close = closest(name, options)
    return f" (did you mean {close!r}?)" if close is not None else ""


def short(err: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name if empty), at most ``limit`` characters."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
