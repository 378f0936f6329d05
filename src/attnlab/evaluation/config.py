"""What an ``attnlab eval`` run depends on: :class:`EvalConfig`, and the variant specs (lists of edits) it compares.

A *variant* is one list of edits applied together, in list order, inside one ``Session``. The baseline is the
empty list and always runs first. On the command line each ``--edit`` is one variant; edits composed within a
variant are joined with ``+`` (``temperature:tau=0.9+sink_window:sinks=4,window=252``); the split is
:func:`attnlab.edits.parse_edit_list`'s (a ``+`` before ``NAME:`` starts an edit; ``layers=0-3+7`` is one list).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from attnlab.errors import ConfigError

TASKS = ("perplexity", "next_token", "passkey")
BASELINE = "baseline"
DTYPES = ("float32", "float64", "bfloat16", "float16")


def parse_variant(spec: str) -> list[Any]:
    """Edit objects for one variant spec, by :func:`attnlab.edits.parse_edit_list` (edits compose in order).

    Raises ConfigError (bad syntax or values) or RegistryError (unknown edit name, also after a ``+``), one line.
    """
    from attnlab.edits import parse_edit_list
    from attnlab.errors import RegistryError

    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--edit expects NAME:key=value,... (join edits with +), got {spec!r}")
    try:
        return list(parse_edit_list(spec.strip()))
    except (ConfigError, RegistryError) as error:
        raise type(error)(f"--edit {spec.strip()!r}: {error}") from None


def parse_number_list(text: str | list[Any], kind: type, what: str) -> tuple[Any, ...]:
    """``"0,0.5,1"`` or ``[0, 0.5, 1]`` → a tuple of ``kind``; ConfigError (one line) if a value does not parse."""
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(kind(str(item).strip()) for item in items if str(item).strip())
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list of {kind.__name__} values, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} must list at least one value, got {text!r}")
    return values


@dataclass(frozen=True)
class EvalConfig:
    """Everything an eval run depends on; saved (resolved) in ``results.json`` under ``config``.

    Attributes:
        model: bundled name, local directory, ``.gguf`` file or hub id.
        text: UTF-8 text file, or None for the bundled Shakespeare corpus.
        tasks: any of ``perplexity``, ``next_token``, ``passkey``.
        variants: edit specs, one string per variant (baseline not listed; it always runs).
        seq_len: tokens per window fed to the model (BOS included when one is prepended).
        stride: text tokens between window starts; None = the text tokens of one window (non-overlapping).
        max_windows: most windows read for perplexity / next_token.
        bos: ``auto`` | ``always`` | ``never`` (see :mod:`attnlab.text`).
        passkey_lengths: prompt lengths in tokens; empty = ``(seq_len,)``.
        passkey_depths: needle depths as fractions of the haystack, each in [0, 1].
        passkey_trials: prompts per (length, depth) cell, each with its own random key and haystack offset.
        dtype, device, seed: as for ``attnlab report``; ``device`` is where the model is loaded (a model passed to
            ``run_eval`` runs where its weights are). Passkey keys and offsets come from ``random.Random(seed)``.
    """

    model: str = "smollm2-135m"
    text: str | None = None
    tasks: tuple[str, ...] = ("perplexity", "next_token")
    variants: tuple[str, ...] = ()
    seq_len: int = 512
    stride: int | None = None
    max_windows: int = 4
    bos: str = "auto"
    passkey_lengths: tuple[int, ...] = ()
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_trials: int = 2
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("seq_len", "max_windows", "passkey_trials", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.stride is not None and (isinstance(self.stride, bool) or not isinstance(self.stride, int)
                                        or self.stride < 1):
            raise ConfigError(f"stride must be an integer >= 1, got {self.stride!r}")
        if self.max_windows < 1 or self.passkey_trials < 1:
            raise ConfigError(f"max_windows and passkey_trials must be >= 1, got {self.max_windows}, "
                              f"{self.passkey_trials}")
        if not self.tasks:
            raise ConfigError(f"at least one task is needed; choose from {', '.join(TASKS)}")
        for task in self.tasks:
            if task not in TASKS:
                from attnlab.registry import unknown_name_message

                raise ConfigError(unknown_name_message("task", str(task), list(TASKS)))
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"each task may be given once, got {list(self.tasks)}")
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"each --edit variant may be given once, got {list(self.variants)}")
        for spec in self.variants:
            if not isinstance(spec, str) or not spec.strip():
                raise ConfigError(f"--edit expects NAME:key=value,... (join edits with +), got {spec!r}")
        if any(not 0.0 <= d <= 1.0 for d in self.passkey_depths) or not self.passkey_depths:
            raise ConfigError(f"passkey depths must be fractions in [0, 1], got {list(self.passkey_depths)}")
        percents = [round(100 * d) for d in self.passkey_depths]
        if len(set(percents)) != len(percents):  # rows key a depth by its whole percent (accuracy_by_depth)
            raise ConfigError(f"passkey depths must differ by at least 1 % (rows are keyed by whole percent), got "
                              f"{list(self.passkey_depths)}")
        if any(length < 2 for length in self.passkey_lengths):
            raise ConfigError(f"passkey lengths must be >= 2 tokens, got {list(self.passkey_lengths)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.passkey_lengths or (self.seq_len,)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("tasks", "variants", "passkey_lengths", "passkey_depths"):
            data[key] = list(data[key])
        data["passkey_lengths"] = list(self.lengths)
        return data
