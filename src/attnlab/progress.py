"""The progress callback every long-running function takes: ``progress(done, total, message)``.

``done`` and ``total`` count units of work (windows, prompts …); ``total == 0`` means "unknown yet" (a spinner).
The CLI draws it as a rich progress bar on stderr; library callers pass their own or None.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int, str], None]  # (done, total, message)


def silent(done: int, total: int, message: str) -> None:
    """A :data:`Progress` that reports nothing (the default of every function that takes one)."""
