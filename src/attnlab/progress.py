"""The progress callback every long-running function takes: ``progress(done, total, message)``.

``done`` and ``total`` count units of work (windows, forward passes, prompts …); ``total == 0`` means "unknown
yet" (a spinner). ``done`` never decreases within one run; ``total`` is planned up front (an analysis's one pass
per head included) so the percentage only grows, and changes only when a step reports a count that differs from
the plan.

Every function that takes ``progress=`` accepts:

- ``None`` or ``False``: report nothing (:func:`silent`);
- ``True``: print to stderr (:func:`progress_to`): a rich bar with elapsed time and ETA when stderr is a terminal,
  otherwise plain lines (:class:`PlainLines`) such as
  ``[12:03:04] running attention probes on window 3/3, forward passes 2/4 (50%) · 31 s elapsed · ETA 31 s``;
- a callable ``(done, total, message) -> None``, called as is.

Plain lines are printed when the message's stage changes (:func:`stage`: the message before its first `` · ``,
numbers masked, so ``step 3/200: loss 1.2`` and ``step 4/200: loss 1.1`` are one stage), when all work is done,
for every message a caller marks as an event (``always``: an evaluation during training, a finished sweep job;
in a terminal these are printed above the bar), and otherwise at most every ``ATTNLAB_PROGRESS_INTERVAL`` seconds
(default 10; 0 prints every call). :func:`progress_to` is the one place ``progress=`` is resolved; a function
whose body cannot sit in its ``with`` block uses the decorator :func:`takes_progress`.
This module imports neither rich nor torch at import time.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar, Union

from attnlab.errors import ConfigError

Progress = Callable[[int, int, str], None]  # (done, total, message)
ProgressArg = Union[Progress, bool, None]  # what ``progress=`` accepts
Event = Callable[[str], bool]  # True for a message that is always printed as its own line
INTERVAL_ENV = "ATTNLAB_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0
F = TypeVar("F", bound=Callable[..., Any])


def silent(done: int, total: int, message: str) -> None:
    """A :data:`Progress` that reports nothing (the default of every function that takes one)."""


def progress_interval() -> float:
    """Seconds between plain progress lines with an unchanged stage: ``$ATTNLAB_PROGRESS_INTERVAL`` (a number
    ≥ 0) or 10. A value that is not a number ≥ 0 is ignored (the default applies)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 else DEFAULT_INTERVAL


def stage(message: str) -> str:
    """The part of a progress message that names the stage: before its first `` · ``, with numbers masked."""
    return re.sub(r"\d+(?:\.\d+)?", "#", message.split(" · ", 1)[0])


def _seconds(value: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    value = max(0, int(round(value)))
    if value < 60:
        return f"{value} s"
    if value < 3600:
        return f"{value // 60} min {value % 60:02d} s"
    return f"{value // 3600} h {value % 3600 // 60:02d} min"


class PlainLines:
    """A :data:`Progress` that writes plain timestamped lines (for logs, CI, pipes: no terminal control codes).

    Each line: ``[HH:MM:SS] message done/total (pct%) · N s elapsed · ETA M s`` (counts after `` · `` when the
    message has details, ``step 3/8: loss 1.2 · 3/8 (37%) · …``; counts and ETA only when
    ``total > 0``; the ETA once some work is done, from the rate since the first known total). A line is written
    when the :func:`stage` changes, when all work is done, for a message ``always(message)`` marks as an event,
    and otherwise at most every ``interval`` seconds (default :func:`progress_interval`).
    """

    def __init__(self, stream: TextIO | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic, always: Event | None = None) -> None:
        self.stream, self.always = stream, always
        self.interval = progress_interval() if interval is None else interval
        self.clock = clock
        self.started = clock()
        self.rate_start: tuple[float, int] | None = None  # (time, done) when a total was first known
        self.last_stage: str | None = None
        self.last_line = float("-inf")
        self.last_done = -1

    def __call__(self, done: int, total: int, message: str) -> None:
        now = self.clock()
        if total > 0 and self.rate_start is None:
            self.rate_start = (now, done)
        current = stage(message)
        finished = total > 0 and done >= total and done != self.last_done
        event = self.always is not None and self.always(message)
        if current == self.last_stage and not finished and not event and now - self.last_line < self.interval:
            return
        self.last_stage, self.last_line, self.last_done = current, now, done
        print(self.line(done, total, message, now), file=self.stream or sys.stderr, flush=True)

    def line(self, done: int, total: int, message: str, now: float) -> str:
        """The text of one progress line at time ``now`` (no newline)."""
        parts = [f"[{time.strftime('%H:%M:%S')}] {message}"]
        if total > 0:  # after a message with details (`` · `` or ``: ``) as a part of its own
            counts = f"{done}/{total} ({100 * done // total}%)"
            if " · " in message or ": " in message:
                parts.append(counts)
            else:
                parts[0] += f" {counts}"
        parts.append(f"{_seconds(now - self.started)} elapsed")
        if total > 0 and self.rate_start is not None and done < total:
            since, done0 = self.rate_start
            if done > done0 and now > since:
                parts.append(f"ETA {_seconds((now - since) / (done - done0) * (total - done))}")
        return " · ".join(parts)


@contextmanager
def progress_to(progress: ProgressArg, *, console: Any = None, always: Event | None = None) -> Iterator[Progress]:
    """The :data:`Progress` that ``progress=`` asks for, open for the duration of the ``with`` block.

    ``None``/``False`` → :func:`silent`; a callable → itself; ``True`` → stderr output: a rich bar (description,
    bar, done/total, elapsed, ETA) when stderr (or ``console``, a rich Console) is a terminal, else
    :class:`PlainLines`. ``always(message)`` marks events (an evaluation line) that are printed as their own line
    above the bar, or always printed as plain lines. Raises ConfigError for anything else.
    """
    if progress is None or progress is False:
        yield silent
        return
    if callable(progress):
        yield progress
        return
    if progress is not True:
        raise ConfigError(f"progress must be None, True/False or a callable (done, total, message), got {progress!r}")
    terminal = console.is_terminal if console is not None else sys.stderr.isatty()
    if not terminal:
        yield PlainLines(stream=getattr(console, "file", None), always=always)
        return
    from rich.progress import (
        BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    if console is None:
        from rich.console import Console

        console = Console(stderr=True, highlight=False, soft_wrap=True)
    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("elapsed"),
             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task("starting", total=None)

        def update(done: int, total: int, message: str) -> None:
            if always is not None and always(message):
                bar.console.print(message, markup=False, highlight=False, style="dim")
            bar.update(task, description=message, completed=done, total=total or None)

        yield update


def takes_progress(function: F) -> F:
    """Decorator: the keyword argument ``progress`` (a :data:`ProgressArg`) reaches ``function`` as a
    :data:`Progress`, opened by :func:`progress_to` for the duration of the call."""

    @functools.wraps(function)
    def wrapper(*args: Any, progress: ProgressArg = None, **kwargs: Any) -> Any:
        with progress_to(progress) as notify:
            return function(*args, progress=notify, **kwargs)

    return wrapper  # type: ignore[return-value]
