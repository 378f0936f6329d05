"""Edit bookkeeping for a session: what each edit touched, how much it changed, and whether it fired at all.

docs/edits.md: a session reports, per edit, how many attention calls it touched and the max change it made,
and fails loudly if an edit that was asked for never fired.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from attnlab.edits.apply import EditedCall, EditRecord, order_edits
from attnlab.edits.base import AttentionCall, Edit
from attnlab.errors import ConfigError, DistributedError, EditNotFiredError
from attnlab.facts import ModelFacts

logger = logging.getLogger(__name__)

REPORT_COLUMNS = ("edit", "spec", "stage", "path", "calls_touched", "heads_touched", "forward_passes_touched",
                  "max_change", "identity", "skipped")


def make_edit(spec: str | Edit) -> Edit:
    """An Edit instance, or one parsed from a spec like ``"temperature:tau=0.9"``."""
    if isinstance(spec, Edit):
        return spec
    if isinstance(spec, str):
        from attnlab.edits.spec import parse_edit_spec

        return parse_edit_spec(spec)
    raise TypeError(f"edits must be Edit instances or specs like 'temperature:tau=0.9', got {type(spec).__name__}")


def check_edits(edits: Iterable[str | Edit], facts: ModelFacts) -> list[Edit]:
    """The edits in composition order, each checked against the model before anything runs.

    Every edit's :meth:`~attnlab.edits.base.Edit.check_model` hook runs: layers/heads the model has, and state only
    the Python API can give (``mean_ablation:source=recorded``'s means, ``head_patch``'s source).

    Raises:
        ConfigError: the first edit that cannot run on this model (one line).
    """
    ordered = order_edits([make_edit(e) for e in edits])
    for edit in ordered:
        edit.check_model(facts.num_layers, facts.num_heads)
    return ordered


class EditLog:
    """The edits of a session, in composition order, with one :class:`EditRecord` each.

    Args:
        edits: Edit instances or specs. facts: the model (layers and heads are checked against it).
        verify_rows: query rows per call on which each edit's change is measured; 0 counts calls and heads only.

    Raises:
        ConfigError: an edit names a layer or head the model does not have, or verify_rows < 0.
    """

    def __init__(self, edits: Iterable[str | Edit], facts: ModelFacts, verify_rows: int) -> None:
        self.edits: list[Edit] = check_edits(edits, facts)
        for edit in self.edits:
            edit.reset()  # a fresh session: nothing left over from calls of an earlier one
        if verify_rows < 0:
            raise ConfigError(f"verify_rows must be >= 0, got {verify_rows}")
        self.facts, self.verify_rows = facts, verify_rows
        self.records: dict[int, EditRecord] = {id(edit): EditRecord() for edit in self.edits}
        self.position_edits = [edit for edit in self.edits if edit.stage == "positions"]
        self.step: int | None = None  # the denoising step of the calls in flight (Session.set_step), or None

    def for_layer(self, layer: int) -> list[Edit]:
        """The edits that act on ``layer`` (their ``layers`` include it) at the current denoising ``step`` (their
        ``steps`` include it, :meth:`Edit.applies_at`), in composition order; [] if none."""
        return [edit for edit in self.edits if edit.applies_to(layer) and edit.applies_at(self.step)]

    def forward_pass(self, edit: Edit) -> None:
        """A positions-stage edit remapped the position ids of one forward pass."""
        self.records[id(edit)].forward_passes_touched += 1

    def acting(self, layer: int) -> list[Edit]:
        """The edits of ``layer`` (:meth:`for_layer`) whose parameters are not the identity: only these choose the
        attention path and run, so an identity edit leaves the logits bit-identical to a session without it."""
        return [edit for edit in self.for_layer(layer) if not edit.is_identity()]

    def attention_call(self, query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None, call: AttentionCall, *,
                       block_size: int, softcap: float | None) -> EditedCall | None:
        """The call under its layer's acting edits (None if none acts there: no edit, or only identity edits), with
        every edit of the layer counted (identity edits too, with max change 0) and each acting edit's change
        measured on ``verify_rows`` rows. Tensors as :class:`attnlab.edits.apply.EditedCall` takes them."""
        edits, acting = self.for_layer(call.layer_idx), self.acting(call.layer_idx)
        running = {id(edit) for edit in acting}
        with torch.no_grad():
            for edit in edits:
                if id(edit) not in running or not self.verify_rows:  # verify() counts the acting ones
                    self.records[id(edit)].count_call(edit, call)
        if not acting:
            return None
        edited = EditedCall(query, key, value, keep, edits=acting, call=call, block_size=block_size, softcap=softcap)
        if self.verify_rows:
            with torch.no_grad():
                edited.verify(self.records, self.verify_rows)
        return edited

    def record_states(self) -> list[dict[str, Any]]:
        """Each edit's record as JSON (composition order, :meth:`EditRecord.to_json`); :meth:`combine` merges
        such lists."""
        return [self.records[id(edit)].to_json() for edit in self.edits]

    def combine(self, states: Iterable[list[dict[str, Any]]]) -> None:
        """Replace the records by the merge of several :meth:`record_states` of this log's edits (one per rank, or
        per part of a run; :meth:`EditRecord.merge`: calls and forward passes touched add up, heads touched are
        the union, the max change is the max). Counts are exact; so is the max (no arithmetic).

        Raises:
            DistributedError: a list whose length is not the number of edits, or a malformed record (an internal
                invariant: the lists come from attnlab's own ranks; exit 1, not a usage error).
        """
        merged = {id(edit): EditRecord() for edit in self.edits}
        for state in states:
            if len(state) != len(self.edits):
                raise DistributedError(f"an edit-record list has {len(state)} entries but the session has "
                                       f"{len(self.edits)} edits")
            for edit, part in zip(self.edits, state):
                merged[id(edit)] = merged[id(edit)].merge(EditRecord.from_json(part))
        self.records = merged

    def gather(self) -> None:
        """Merge every rank's records into this log, on every rank (:meth:`combine` of
        :func:`attnlab.distributed.all_gather_json`; nothing when one process runs), so :meth:`report` and
        :meth:`check_fired` decide on the global counts and every rank raises (or not) alike. A collective:
        every rank must call it, in the same order as its other collectives."""
        from attnlab.distributed import all_gather_json, world

        if world().active:
            self.combine(all_gather_json(self.record_states(), "the edit reports"))

    def report(self, attention_paths: Mapping[int, str]) -> Any:
        """A pandas DataFrame, one row per edit: edit (name), spec, stage, path (the attention paths of the layers
        it touched), calls_touched, heads_touched, forward_passes_touched (positions edits), max_change (the largest
        change of a per-head output the edit made on the sampled rows; NaN if not measured; for a positions edit
        only its mask part is measured, since the position ids are already in the query/key the attention call
        receives), identity (whether its parameters are the identity), skipped (the calls it passed through
        unchanged, by reason: radial and ultravico on cross calls, radial's dense steps and blocks;
        :meth:`Edit.skip_summary`)."""
        import pandas as pd

        num_layers, num_heads = self.facts.num_layers, self.facts.num_heads
        rows = []
        for edit in self.edits:
            record = self.records[id(edit)]
            layers = sorted({layer for layer, _ in record.heads_touched})
            if edit.stage == "positions" and record.forward_passes_touched:
                # position ids feed RoPE in every layer: every (layer, head) is touched, not only the masked ones
                layers, touched = list(range(num_layers)), num_layers * num_heads
            else:
                touched = len(record.heads_touched)
            rows.append({
                "edit": edit.name, "spec": edit.spec(), "stage": edit.stage,
                "path": ",".join(sorted({attention_paths[layer] for layer in layers if layer in attention_paths})),
                "calls_touched": record.calls_touched, "heads_touched": touched,
                "forward_passes_touched": record.forward_passes_touched,
                "max_change": record.max_change if self.verify_rows and record.calls_touched else float("nan"),
                "identity": edit.is_identity(), "skipped": edit.skip_summary(),
            })
        return pd.DataFrame(rows, columns=list(REPORT_COLUMNS))

    def check_fired(self) -> None:
        """Raise EditNotFiredError naming every edit that acted on no attention call and no forward pass.

        An edit that fired but changed no measured output (max change exactly 0 on the verified rows, parameters
        not the identity: e.g. a ``sink_window`` whose window is longer than the sequence) is logged as a warning,
        since its results will equal the baseline's."""
        silent = [edit.spec() for edit in self.edits if self.records[id(edit)].calls_touched == 0
                  and self.records[id(edit)].forward_passes_touched == 0]
        skipped = [f"{edit.spec()} ({edit.skip_summary()})" for edit in self.edits
                   if edit.spec() in silent and edit.skip_summary()]
        if skipped and len(skipped) == len(silent):
            raise EditNotFiredError(f"edit(s) never acted: every call they saw was one they skip by definition: "
                                    f"{'; '.join(skipped)} (were there more denoising steps than dense_steps, more "
                                    "blocks than dense_layers?)")
        if silent:
            raise EditNotFiredError(
                f"edit(s) never fired: {', '.join(silent)} — no attention call passed through them (did the model "
                "run inside the session, do their layers exist, and do their queries=/keys= roles occur in the "
                "input? a text-only model has only text tokens)")
        from attnlab.distributed import world

        for edit in self.edits if world().is_main else ():  # the warning once, from rank 0, when several run
            record = self.records[id(edit)]
            if (self.verify_rows and record.calls_touched and record.max_change == 0 and edit.stage != "positions"
                    and not edit.is_identity() and not getattr(edit, "observes_only", False)):  # e.g. a recorder
                calls = record.calls_touched
                logger.warning("edit %s acted on %d attention call%s but changed no output on the measured rows (max "
                               "change 0): its results equal the baseline's%s", edit.spec(), calls,
                               "" if calls == 1 else "s", _no_change_hint(edit))


def _no_change_hint(edit: Any) -> str:
    """A likely cause of an edit that fired but changed nothing, for the edits that have one."""
    params = edit.params()
    if "window" in params:
        return " (is a window longer than the sequence?)"
    if edit.name == "var":
        return (f" (did any token pass the sink threshold tau={params.get('tau')}, and any head the summ/rho test? "
                "a small model may need a lower tau=)")
    return ""
