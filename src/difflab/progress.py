"""Progress a person can follow, on a terminal and in a log file.

:func:`progress` returns one object for a long phase (training, sampling, feature extraction):

* on a terminal (the stream, stderr by default, is a TTY): a tqdm bar;
* otherwise (stderr redirected to a file, a pipe, a CI log): plain lines, never a carriage return: a start line,
  then a line per ~10% of the total or per 30 s without one (whichever comes first; never two within 1 s, so a
  phase of a second or two is just its start and end lines), and a final line with the count, the elapsed time
  and the rate, e.g.
  ``train: 3000/6000 steps (50%), 41.2 steps/s, 1 min 13 s elapsed, ~1 min 13 s left, loss 0.4123``;
* disabled (``enabled=False``, ``--quiet``, or the environment variable ``TQDM_DISABLE`` set to a true value):
  silent.

``write(msg)`` prints a message line (to stdout, as ``tqdm.write`` does) without breaking a bar, whether or not the
progress itself is shown. Environment variables (plain lines): ``DIFFLAB_PROGRESS_SECONDS`` (the most seconds
without a line, default 30), ``DIFFLAB_PROGRESS_FRACTION`` (the share of the total between two lines, default 0.1),
``DIFFLAB_PROGRESS_MIN_SECONDS`` (the least seconds between two lines, default 1); and ``DIFFLAB_PROGRESS``
(``bar``, ``lines`` or ``off``: force one kind whatever the stream).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import IO

DEFAULT_SECONDS = 30.0
DEFAULT_FRACTION = 0.1
DEFAULT_MIN_SECONDS = 1.0
_FALSE = ("", "0", "false", "no", "off", "none")


def progress(total: int | None, desc: str, unit: str = "step", enabled: bool = True, initial: int = 0,
             stream: IO | None = None, seconds: float | None = None, fraction: float | None = None,
             min_seconds: float | None = None, leave: bool = True) -> Progress:
    """A progress reporter for ``total`` units (None: unknown) named ``desc``, starting at ``initial``.

    ``stream``: where the progress goes (default: ``sys.stderr`` at the time of the call). Plain lines only:
    ``seconds``, the most seconds without a line; ``fraction``, the share of the total between two lines;
    ``min_seconds``, the least seconds between two lines (defaults: the environment variables above, else 30 s,
    10% and 1 s). ``leave``: a tqdm bar stays on screen when closed.
    """
    stream = sys.stderr if stream is None else stream
    mode = os.environ.get("DIFFLAB_PROGRESS", "").strip().lower()
    if not enabled or _env_true("TQDM_DISABLE") or mode == "off":
        return Progress(total, desc, unit, initial)
    if mode == "bar" or (mode != "lines" and _isatty(stream)):
        return _Bar(total, desc, unit, initial, stream, leave)
    seconds = _env_float("DIFFLAB_PROGRESS_SECONDS", DEFAULT_SECONDS) if seconds is None else float(seconds)
    fraction = _env_float("DIFFLAB_PROGRESS_FRACTION", DEFAULT_FRACTION) if fraction is None else float(fraction)
    min_seconds = (_env_float("DIFFLAB_PROGRESS_MIN_SECONDS", DEFAULT_MIN_SECONDS) if min_seconds is None
                   else float(min_seconds))
    return _Lines(total, desc, unit, initial, stream, seconds, fraction, min_seconds)


class Progress:
    """The silent reporter (progress disabled), and the interface of the others."""

    def __init__(self, total: int | None, desc: str, unit: str = "step", initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = int(initial)
        self.postfix: dict = {}
        self.closed = False

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` units."""
        self.n += n

    def set_postfix(self, **kw) -> None:
        """Values shown after the count, e.g. ``set_postfix(loss=0.41)`` (None removes a key)."""
        for k, v in kw.items():
            if v is None:
                self.postfix.pop(k, None)
            else:
                self.postfix[k] = v

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def write(self, msg: str) -> None:
        """Print a message line (stdout), shown whether or not the progress itself is."""
        print(msg, flush=True)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Bar(Progress):
    """A tqdm bar (a terminal)."""

    def __init__(self, total, desc, unit, initial, stream, leave):
        from tqdm.auto import tqdm

        super().__init__(total, desc, unit, initial)
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, leave=leave,
                        dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        super().update(n)
        self.bar.update(n)

    def set_postfix(self, **kw) -> None:
        super().set_postfix(**kw)
        self.bar.set_postfix({k: _value(v) for k, v in self.postfix.items()}, refresh=False)

    def set_description(self, desc: str) -> None:
        super().set_description(desc)
        self.bar.set_description(desc, refresh=False)

    def write(self, msg: str) -> None:
        self.bar.write(msg)

    def close(self) -> None:
        if not self.closed:
            self.bar.close()
        super().close()


class _Lines(Progress):
    """Plain lines (a log file): a start line, one line per ``fraction`` of the total or ``seconds``, but none within
    ``min_seconds`` of the last, and an end line."""

    def __init__(self, total, desc, unit, initial, stream, seconds, fraction, min_seconds):
        super().__init__(total, desc, unit, initial)
        self.stream, self.seconds, self.min_seconds = stream, max(0.0, seconds), max(0.0, min_seconds)
        self.step = max(1, math.ceil(total * fraction)) if total and fraction > 0 else None
        self.t0 = self.t_last = time.perf_counter()
        self.next_mark = self._mark_after(self.n)
        self.lines = 0
        self._emit(self._count() + ", started" if self.n == 0 else self._count() + ", resumed")

    def _mark_after(self, n: int) -> float:
        return math.inf if self.step is None else (n // self.step + 1) * self.step

    def update(self, n: int = 1) -> None:
        super().update(n)
        now = time.perf_counter()
        if self.total is not None and self.n >= self.total:
            return  # the end line says it
        since = now - self.t_last
        if since >= self.min_seconds and (self.n >= self.next_mark or since >= self.seconds):
            self._emit(self.line(now))

    def close(self) -> None:
        if not self.closed:
            now = time.perf_counter()
            done = self.total is None or self.n >= self.total
            self._emit(self.line(now, final=True) + (", done" if done else ", stopped"))
        super().close()

    def line(self, now: float, final: bool = False) -> str:
        """E.g. 'train: 3000/6000 steps (50%), 41.2 steps/s, 1 min 13 s elapsed, ~1 min 13 s left, loss 0.4123'."""
        elapsed = now - self.t0
        parts = [self._count()]
        done = self.n - self.initial
        if done > 0 and elapsed > 0:
            parts.append(rate(done, elapsed, self.unit))
        parts.append(f"{duration(elapsed)} elapsed")
        if not final and self.total is not None and done > 0 and self.n < self.total:
            parts.append(f"~{duration((self.total - self.n) * elapsed / done)} left")
        parts += [f"{k} {_value(v)}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _count(self) -> str:
        units = plural(self.unit)
        if self.total is None:
            return f"{self.desc}: {self.n} {units}"
        pct = 100.0 * self.n / self.total if self.total else 100.0
        return f"{self.desc}: {self.n}/{self.total} {units} ({pct:.0f}%)"

    def _emit(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self.lines += 1
        self.t_last = time.perf_counter()
        self.next_mark = self._mark_after(self.n)


def plural(unit: str) -> str:
    """'step' -> 'steps'; a unit that already ends in s (or is several words with an s) is kept."""
    head, _, tail = unit.partition(" ")
    head = head if head.endswith("s") else head + "s"
    return f"{head} {tail}" if tail else head


def rate(n: float, seconds: float, unit: str) -> str:
    """'41.2 steps/s', or '3.5 s/step' when slower than one a second."""
    per_s = n / seconds
    head = unit.split(" ")[0]
    if per_s >= 1:
        return f"{per_s:.3g} {plural(head)}/s" if per_s < 1000 else f"{per_s:,.0f} {plural(head)}/s"
    return f"{1 / per_s:.3g} s/{head}"


def duration(seconds: float) -> str:
    """'4.2 s', '45 s', '1 min 13 s', '2 h 05 min'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) and (v == 0 or 1e-3 <= abs(v) < 1e5) else f"{v:.3g}"
    return str(v)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in _FALSE


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default
