"""What an ``attnlab eval`` run depends on: :class:`EvalConfig` (:class:`EvalSpec` composed with the shared model
and text specs of :mod:`attnlab.config`), and the variant specs (lists of edits) it compares.

A *variant* is one list of edits applied together, in list order, inside one ``Session``. The baseline is the
empty list and always runs first. On the command line each ``--edit`` is one variant; edits composed within a
variant are joined with ``+`` (``temperature:tau=0.9+sink_window:sinks=4,window=252``); the split is
:func:`attnlab.edits.parse_edit_list`'s (a ``+`` before ``NAME:`` starts an edit; ``layers=0-3+7`` is one list).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.config import (INT_LIMIT, SEED_LIMIT, ComposedConfig, ModelSpec, TextSpec, check_names, check_range,
                            check_types)
from attnlab.errors import ConfigError

TASKS = ("perplexity", "next_token", "passkey", "choice")
SEARCHES = (None, "zerotuning", "act", "zerotuning_profile")
CHOICE_TASK_NAMES = ("cloze", "ioi", "colored_objects")  # attnlab.evaluation.choice_tasks.CHOICE_TASKS
BASELINE = "baseline"


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
    items = text.split(",") if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else [text]
    try:
        values = tuple(kind(str(item).strip()) for item in items if str(item).strip())
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list of {kind.__name__} values, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} must list at least one value, got {text!r}")
    return values


def number_list_parser(kind: type, what: str) -> Callable[[Any], tuple[Any, ...]]:
    """A one-argument :func:`parse_number_list` for a field's ``metadata={"parse": ...}`` (``what`` names the
    option in its error)."""
    return functools.partial(parse_number_list, kind=kind, what=what)


parse_lengths = number_list_parser(int, "--passkey-lengths")
parse_depths = number_list_parser(float, "--passkey-depths")


def _parse_search_layers(value: Any) -> tuple[int, ...]:
    if value in ("", [], ()):  # empty: every layer (a saved config writes the default as [])
        return ()
    return parse_number_list(value, int, "--search-layers")


@dataclass(frozen=True)
class EvalSpec:
    """What an eval run measures (the eval-only part of :class:`EvalConfig`).

    Attributes:
        tasks: any of ``perplexity``, ``next_token``, ``passkey``, ``choice`` (CLI ``--task``).
        variants: edit specs, one string per variant (baseline not listed; it always runs; CLI ``--edit``).
        stride: text tokens between window starts; None = the text tokens of one window (non-overlapping).
        passkey_lengths: prompt lengths in tokens; empty = ``(seq_len,)``.
        passkey_depths: needle depths as fractions of the haystack, each in [0, 1].
        passkey_trials: prompts per (length, depth) cell, each with its own random key and haystack offset.
        choice_task: for the ``choice`` task: ``cloze``, ``ioi``, ``colored_objects``
            (:mod:`attnlab.evaluation.choice_tasks`) or a JSONL file
            (:func:`attnlab.evaluation.choice.load_choice_items`).
        choice_items: items generated, or the first items read from the file, >= 1; None = 64 generated items or
            every item of the file.
        choice_batch_size: sequences (item × choice) per forward of the choice scorer, >= 1.
        search: None, ``"zerotuning"``, ``"act"`` or ``"zerotuning_profile"`` (:mod:`attnlab.evaluation.search`).
            With the ``choice`` task it is scored on the items (a validation half searched, the other half held
            out; :mod:`attnlab.evaluation.choice_search`); otherwise on the windows (same split by window).
            ``zerotuning_profile`` (profile heads, then γ per head group) needs the ``choice`` task.
        search_layers: layers ACT searches / ZeroTuning profiles (empty = all; CLI ``--search-layers 2,15``).
        seed: seeds python and torch, in [0, 2**63 - 1]; passkey keys and offsets come from ``random.Random(seed)``.
    """

    tasks: tuple[str, ...] = field(default=("perplexity", "next_token"), metadata={"option": "task"})
    variants: tuple[str, ...] = field(default=(), metadata={"option": "edit"})
    stride: int | None = None
    passkey_lengths: tuple[int, ...] = field(default=(), metadata={"parse": parse_lengths})
    passkey_depths: tuple[float, ...] = field(default=(0.0, 0.25, 0.5, 0.75, 1.0), metadata={"parse": parse_depths})
    passkey_trials: int = 2
    choice_task: str = "cloze"
    choice_items: int | None = None
    choice_batch_size: int = 8
    search: str | None = None
    search_layers: tuple[int, ...] = field(default=(), metadata={"parse": _parse_search_layers})
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, {"passkey_trials": int, "seed": int, "choice_task": str, "choice_batch_size": int})
        if self.choice_items is not None:
            check_types(self, {"choice_items": int})
        check_names("tasks", self.tasks)
        check_names("variants (--edit)", self.variants)
        if self.stride is not None and (isinstance(self.stride, bool) or not isinstance(self.stride, int)
                                        or self.stride < 1):
            raise ConfigError(f"stride must be an integer >= 1, got {self.stride!r}")
        check_range(self, {"stride": (1, INT_LIMIT), "passkey_trials": (1, INT_LIMIT), "seed": (0, SEED_LIMIT),
                           "choice_items": (1, INT_LIMIT), "choice_batch_size": (1, INT_LIMIT)})
        if "choice" in self.tasks and self.choice_task not in CHOICE_TASK_NAMES \
                and not Path(self.choice_task).is_file():
            from attnlab.registry import unknown_name_message

            raise ConfigError(unknown_name_message("choice task", self.choice_task, list(CHOICE_TASK_NAMES))
                              + " (or an existing JSONL file)")
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
            if not spec.strip():
                raise ConfigError(f"--edit expects NAME:key=value,... (join edits with +), got {spec!r}")
        if any(not 0.0 <= d <= 1.0 for d in self.passkey_depths) or not self.passkey_depths:
            raise ConfigError(f"passkey depths must be fractions in [0, 1], got {list(self.passkey_depths)}")
        percents = [round(100 * d) for d in self.passkey_depths]
        if len(set(percents)) != len(percents):  # rows key a depth by its whole percent (accuracy_by_depth)
            raise ConfigError(f"passkey depths must differ by at least 1 % (rows are keyed by whole percent), got "
                              f"{list(self.passkey_depths)}")
        if any(not 2 <= length <= INT_LIMIT for length in self.passkey_lengths):
            shown = [n if abs(n) < 10**30 else "a larger number" for n in self.passkey_lengths]
            raise ConfigError(f"passkey lengths must be >= 2 tokens and <= {INT_LIMIT}, got {shown}")
        if self.search not in SEARCHES:
            raise ConfigError(f"--search must be zerotuning, act or zerotuning_profile, got {self.search!r}")
        if any(isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 for layer in self.search_layers) \
                or len(set(self.search_layers)) != len(self.search_layers):
            raise ConfigError(f"--search-layers must be distinct layer indices >= 0, got {list(self.search_layers)}")


@dataclass(frozen=True, init=False)
class EvalConfig(ComposedConfig):
    """Everything an eval run depends on; saved (resolved, flat) in ``results.json`` under ``config``.

    ``load`` (:class:`attnlab.config.ModelSpec`: model, dtype, device — ``device`` is where the model is loaded; a
    model passed to ``run_eval`` runs where its weights are), ``data`` (:class:`attnlab.config.TextSpec`: text,
    seq_len, max_windows, bos; ``max_windows`` bounds the perplexity / next_token windows) and ``eval``
    (:class:`EvalSpec`). Build it from flat names: ``EvalConfig(seq_len=256, variants=("temperature:tau=0.9",))``.
    """

    load: ModelSpec = field(default_factory=ModelSpec)
    data: TextSpec = field(default_factory=TextSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def __post_init__(self) -> None:
        search, tasks = self.eval.search, set(self.eval.tasks)
        if search is None:
            return
        if "choice" in tasks:
            if self.eval.choice_items is not None and self.eval.choice_items < 2:  # None: 64 generated or all
                raise ConfigError(f"--search on --task choice needs --choice-items >= 2 (a validation and a "
                                  f"held-out half), got {self.eval.choice_items}")
        elif search == "zerotuning_profile":
            raise ConfigError("--search zerotuning_profile needs --task choice (it is scored on multiple choice)")
        elif self.data.max_windows < 2 or not {"perplexity", "next_token"} & tasks:
            raise ConfigError("--search needs --task choice, or --max-windows >= 2 and the perplexity or "
                              "next_token task (it splits the items or windows into a validation and a held-out "
                              "half)")

    @property
    def lengths(self) -> tuple[int, ...]:
        """The passkey prompt lengths: ``passkey_lengths``, or ``(seq_len,)`` when none are given."""
        return self.eval.passkey_lengths or (self.data.seq_len,)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["passkey_lengths"] = list(self.lengths)
        return data
