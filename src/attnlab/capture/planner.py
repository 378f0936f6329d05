"""The attention-path planner: which kernel runs one attention call, decided from plain facts.

:func:`plan` is a pure function of four small records, so its whole table is tested without a model
(tests/capture/test_planner.py). The session asks it once per attention call and runs the executor of the chosen
:class:`Path` (:data:`attnlab.capture.executors.EXECUTORS`); the path is recorded per layer in
``session.attention_paths`` and written to results.json under the same values.

The table (first matching row wins; "sample" = ``query_fraction < 1`` and no probe needs every row):

    edits  all edits fast  probs needed  softcap  sample  flex & flex-ready  →  path
    no     –               no            no       –       –                     sdpa
    no     –               yes           no       yes     –                     sdpa+sampled_probs
    no     –               any           any      any     –                     blocked_eager
    yes    yes             no            no       –       –                     sdpa+edits
    yes    yes             yes           no       yes     –                     sdpa+edits+sampled_probs
    yes    any             no            no       –       yes                   flex+edits
    yes    any             any           any      any     any                   blocked_eager+edits

A ``blocked_eager`` call runs the fused probe kernel instead (path ``fused``,
:func:`attnlab.capture.executors.fused_plan`) when the session's ``probe_kernel`` is ``"fused"`` (the default),
every probe that reads probs has a fused form for the call, and :func:`attnlab.capture.executors.fused_fallback`
allows it (no soft-capping, no gradient through the attention); otherwise it stays ``blocked_eager``, so results
say which kernel produced the statistics.

Layers of attnlab's own models (``attnlab.lab``) that compute their own attention (linear attention, sigmoid,
score_mod layers) are not planned: they hand the session the map they imply and are recorded as
``implied:<kind>`` (the map's kind: ``implied:softmax``, ``implied:normalised``, ``implied:proxy``,
``implied:signed``; :func:`attnlab.capture.executors.observe_implied`).

A fallback (the user asked for something the call cannot use: ``flex=True``, ``query_fraction < 1``, or a
model that soft-caps its logits, which SDPA cannot apply) is explained by :func:`fallback_reason`; the
:class:`Planner` logs each distinct reason once at INFO.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

logger = logging.getLogger(__name__)


class Path(str, Enum):
    """The attention paths (their values are the strings results.json records)."""

    SDPA = "sdpa"
    BLOCKED_EAGER = "blocked_eager"
    FUSED = "fused"  # not planned: a blocked_eager call the fused probe kernel serves (set by the session)
    SDPA_SAMPLED = "sdpa+sampled_probs"
    SDPA_EDITS = "sdpa+edits"
    SDPA_EDITS_SAMPLED = "sdpa+edits+sampled_probs"
    FLEX_EDITS = "flex+edits"
    BLOCKED_EAGER_EDITS = "blocked_eager+edits"
    IMPLIED = "implied"  # not planned: a layer shows the map it implies; recorded as "implied:<map kind>"
    # not planned: an edited call whose one acting edit offers a block form (radial's block rule) and no probe reads
    # probs runs the block-sparse kernel instead (set by the session, attnlab.capture.block_sparse_path)
    BLOCK_SPARSE_EDITS = "block_sparse+edits"


    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Needs:
    """What the probes of this call need: ``probs`` (some probe reads probs), ``every_row`` (some probe needs
    every query row, e.g. a KV-cache policy's H2O scores, so rows are never sampled) and ``value`` (some probe
    reads the call record on any path; not a path choice, but without any need the session skips the record)."""

    probs: bool = False
    every_row: bool = False
    value: bool = False

    @classmethod
    def of(cls, needs: Iterable[frozenset[str]]) -> Needs:
        """From the probes' ``needs`` sets."""
        union = frozenset().union(*needs)
        return cls(probs="probs" in union, every_row="every_row" in union, value="value" in union)


@dataclass(frozen=True)
class EditFacts:
    """The edits acting on this call: ``present``; ``fast`` (every one has an SDPA form); ``flex_ready`` (every
    logits edit has a FlexAttention ``ScoreMod`` and every probs edit a fast form)."""

    present: bool = False
    fast: bool = True
    flex_ready: bool = False

    @classmethod
    def of(cls, edited: Any, flex: bool) -> EditFacts:
        """From an :class:`attnlab.edits.apply.EditedCall` (or None without edits); ``flex_ready`` is only asked
        when ``flex`` is on (it builds the edits' Flex forms)."""
        if edited is None:
            return cls()
        return cls(present=True, fast=edited.is_fast(), flex_ready=flex and edited.flex_ready())


@dataclass(frozen=True)
class CallFacts:
    """What the model passes with this call: ``softcap`` (the logits are soft-capped, Gemma 2)."""

    softcap: bool = False


@dataclass(frozen=True)
class Options:
    """The session's choices: ``query_fraction`` in (0, 1] and ``flex`` (allow compiled FlexAttention)."""

    query_fraction: float = 1.0
    flex: bool = False


def plan(needs: Needs, edits: EditFacts, call: CallFacts, options: Options) -> Path:
    """The path for one attention call (the table in the module docstring)."""
    sample = options.query_fraction < 1 and not needs.every_row
    if not edits.present:
        if call.softcap:
            return Path.BLOCKED_EAGER
        if not needs.probs:
            return Path.SDPA
        return Path.SDPA_SAMPLED if sample else Path.BLOCKED_EAGER
    fast = edits.fast and not call.softcap
    if fast and not needs.probs:
        return Path.SDPA_EDITS
    if fast and sample:
        return Path.SDPA_EDITS_SAMPLED
    if options.flex and not needs.probs and edits.flex_ready and not call.softcap:
        return Path.FLEX_EDITS
    return Path.BLOCKED_EAGER_EDITS


def fallback_reason(needs: Needs, edits: EditFacts, call: CallFacts, options: Options, path: Path) -> str | None:
    """Why ``path`` is slower than what the options asked for or than plain SDPA, or None if it is not."""
    if path not in (Path.BLOCKED_EAGER, Path.BLOCKED_EAGER_EDITS):
        return None
    if options.flex and edits.present:
        why = ("the model soft-caps its logits" if call.softcap else "a probe needs probs" if needs.probs
               else "an edit has no FlexAttention form")
        return f"flex=True but {why}; running the blocked eager kernel"
    if options.query_fraction < 1 and needs.probs:
        why = ("the model soft-caps its logits" if call.softcap else "a probe needs every query row (H2O scores)"
               if needs.every_row else "an edit has no fast (SDPA) form")
        return f"query_fraction={options.query_fraction:g} but {why}; probes see every row of the blocked kernel"
    if call.softcap and not needs.probs and edits.fast:  # with or without edits, SDPA would have run
        return "the model soft-caps its logits, which SDPA does not; running the blocked eager kernel"
    return None


@dataclass
class Planner:
    """:func:`plan` with the session's options, logging each distinct fallback reason once at INFO."""

    options: Options
    logged: set[str] = field(default_factory=set)

    def choose(self, needs: Needs, edits: EditFacts, call: CallFacts) -> Path:
        """The path :func:`plan` picks for this call under the session's options; a fallback reason
        (:func:`fallback_reason`) is logged at INFO the first time it occurs."""
        path = plan(needs, edits, call, self.options)
        reason = fallback_reason(needs, edits, call, self.options, path)
        if reason is not None and reason not in self.logged:
            self.logged.add(reason)
            logger.info("attention path %s: %s", path.value, reason)
        return path
