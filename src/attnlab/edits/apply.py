"""Run one attention call with a list of edits: choose the path, apply each stage, verify what each edit did.

Pure torch (no transformers): the session (capture/) hands in the call's tensors and its call record
(:class:`~attnlab.probes.base.AttentionCall`, which every edit receives), and asks for the output in one of three
forms; which form runs is the planner's choice (:mod:`attnlab.capture.planner`).

Forms (the path names the planner records):
- ``sdpa+edits``: every edit has a fast form (query scaling, key bias, mask, closed-form output, output scaling) and
  no probe needs probs: one SDPA call, no probs materialised. A key bias ``coef[h] * indicator[b, k]`` rides along
  as one extra query/key dimension (query column ``coef[h] / scale``, key column ``indicator``; value gets a zero
  column so all three head dims stay equal, which keeps SDPA on its fused kernels), so SDPA adds it to the logits
  exactly without a float mask.
- ``flex+edits`` (opt-in, ``Session(..., flex=True)``): when SDPA cannot run an edit (``window_decay``) but every
  logits edit has a Flex form, compiled FlexAttention with the edits as one score_mod and the mask as a block mask;
  no probs materialised; the first call per shape compiles (about 20 s on CPU).
- ``blocked_eager+edits``: the blocked kernel with the edits' ``logits_mod``/``probs_mod`` hooks, one query block at
  a time (probes, when present, see the edited probs).

Self-verification (docs/edits.md): for each call, the head outputs of up to ``verify_rows`` query rows (evenly
spread over the real queries) are recomputed with the blocked kernel with no edit, then with the first edit, the
first two, ... in composition order; an edit's ``max_change`` is the largest absolute change of the per-head
output it made on those rows (in the value's units), over the heads it acts on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from attnlab.edits.base import STAGES, AttentionCall, Edit
from attnlab.errors import DistributedError
from attnlab.functional.attention import BlockView, blocked_attention

# (query, key, value, keep or None = the model's own mask) → (B, Hq, Lq, Dv)
SdpaFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


@dataclass
class EditRecord:
    """What one edit did over a session: attention calls touched, (layer, head) pairs touched, max output change."""

    calls_touched: int = 0
    heads_touched: set[tuple[int, int]] = field(default_factory=set)
    max_change: float = 0.0
    forward_passes_touched: int = 0  # positions-stage edits count model forward passes here

    def count_call(self, edit: Edit, call: AttentionCall) -> None:
        """One attention call passed through ``edit``: count it and the (layer, head) pairs it acts on (none when
        its ``queries=``/``keys=`` roles select no token of the call)."""
        if edit.role_restricted and not bool(edit.selection(call).any()):
            return
        if edit.skip_reason(call) is not None:  # passed through unchanged (radial on a cross call)
            return
        self.calls_touched += 1
        heads = edit.head_mask(call).nonzero().flatten().tolist()
        self.heads_touched.update((call.layer_idx, int(h)) for h in heads)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON: every field by name, ``heads_touched`` as sorted ``[layer, head]`` pairs."""
        return {"calls_touched": self.calls_touched, "heads_touched": sorted(map(list, self.heads_touched)),
                "max_change": self.max_change, "forward_passes_touched": self.forward_passes_touched}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EditRecord:
        """The record :meth:`to_json` wrote. DistributedError (exit 1: records come from attnlab itself, e.g.
        another rank) unless ``data`` has exactly the record's fields."""
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise DistributedError(f"an edit record has fields {sorted(data)}; expected {sorted(names)}")
        return cls(int(data["calls_touched"]), {(int(layer), int(head)) for layer, head in data["heads_touched"]},
                   float(data["max_change"]), int(data["forward_passes_touched"]))

    def merge(self, other: EditRecord) -> EditRecord:
        """The record of both parts of a session (e.g. two ranks' windows): calls and forward passes touched add
        up, heads touched are the union, the max change is the max. Exact (no rounding)."""
        return EditRecord(self.calls_touched + other.calls_touched, self.heads_touched | other.heads_touched,
                          max(self.max_change, other.max_change),
                          self.forward_passes_touched + other.forward_passes_touched)


def order_edits(edits: Sequence[Edit]) -> list[Edit]:
    """Stage order (positions → logits → mask → probs → output), list order within a stage."""
    return sorted(edits, key=lambda edit: STAGES.index(edit.stage))


def _apply_keep_mod(keep: Tensor | None, edit: Edit, call: AttentionCall) -> Tensor | None:
    """The keep mask after ``edit``'s mask stage, on the edit's heads only."""
    current = keep if keep is not None else torch.ones(1, 1, call.q_len, call.kv_len, dtype=torch.bool,
                                                       device=call.device)
    edited = edit.keep_mod(current, call)
    if edited is None:
        return keep
    if edit.heads is None and not edit.role_restricted:  # every head, every token
        return edited
    return torch.where(edit.selection(call), edited, current)


def _rows_only(edit: Edit, call: AttentionCall, rows: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """``new`` on the edit's ``queries=`` rows, ``old`` elsewhere (probs and output edits; keys are the edit's own
    business there). ``rows``: the query rows of the block (all when None)."""
    if edit.queries is None:
        return new
    selected = edit.query_role_mask(call)
    selected = selected if rows is None else selected[:, rows.to(selected.device)]
    return torch.where(selected[:, None, :, None].to(new.device), new, old)


class EditedCall:
    """One attention call under a list of edits (already ordered and filtered to this layer).

    Args:
        query: (B, Hq, Lq, D). key: (B, Hkv, Lk, D). value: (B, Hkv, Lk, Dv).
        keep: bool broadcastable to (B, Hq, Lq, Lk), the model's own mask (True = attend), or None.
        edits: the edits, in composition order (:func:`order_edits`). call: the call record every edit receives
            (its ``scale`` is the logit scale). block_size: query rows per block of the blocked kernel.
        softcap: the model's logit soft-cap, or None.
    """

    def __init__(self, query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None, *, edits: Sequence[Edit],
                 call: AttentionCall, block_size: int, softcap: float | None = None) -> None:
        self.query, self.key, self.value = query, key, value
        self.edits, self.call = list(edits), call
        self.scale, self.block_size, self.softcap = call.scale, block_size, softcap
        B, Hq, Lq, _ = query.shape
        self.shape = (B, Hq, Lq, key.shape[2])
        # keeps[k] = the mask after the first k edits' mask stage
        self.keeps: list[Tensor | None] = [keep]
        for edit in self.edits:
            self.keeps.append(_apply_keep_mod(self.keeps[-1], edit, call))
        self.mask_changed = self.keeps[-1] is not self.keeps[0]
        for k, edit in enumerate(self.edits):
            if edit.needs_prepare:
                edit.prepare(call, lambda on_block, k=k: self._blocked(k, on_block=on_block))

    @property
    def keep(self) -> Tensor | None:
        """The keep mask after every edit's mask stage (bool, broadcastable to (B, Hq, Lq, Lk)), or None if
        neither the model nor an edit masks."""
        return self.keeps[-1]

    def is_fast(self) -> bool:
        """True if SDPA can run the call: no logit soft-cap and every edit has a fast (SDPA) form."""
        return self.softcap is None and all(edit.fast and not edit.role_restricted for edit in self.edits)

    def flex_ready(self) -> bool:
        """True if the call can run in FlexAttention: every logits edit has a Flex form, every probs edit a fast
        form."""
        return self.softcap is None and not any(edit.role_restricted for edit in self.edits) and all(
            (edit.stage != "logits" or edit.as_score_mod(self.call) is not None)
            and (edit.stage != "probs" or edit.fast) for edit in self.edits)

    # the blocked (eager) form ------------------------------------------------------------------------------
    def hooks(self, count: int | None = None) -> tuple[Callable | None, Callable | None]:
        """The kernel's ``LogitsMod`` / ``ProbsMod`` chaining the first ``count`` edits (all by default)."""
        chosen, call = self.edits[:count], self.call
        logits_edits = [edit for edit in chosen if edit.stage == "logits"]
        probs_edits = [edit for edit in chosen if edit.stage == "probs"]

        def logits_mod(logits: Tensor, rows: Tensor) -> Tensor:
            for edit in logits_edits:
                edited = edit.logits_mod(logits, rows, call)
                if edit.role_restricted:
                    edited = torch.where(edit.selection(call, rows, logits.shape[-1]).to(logits.device), edited,
                                         logits)
                logits = edited
            return logits

        def probs_mod(probs: Tensor, rows: Tensor, keep: Tensor | None) -> Tensor:
            for edit in probs_edits:
                probs = _rows_only(edit, call, rows, edit.probs_mod(probs, rows, keep, call), probs)
            return probs

        return (logits_mod if logits_edits else None), (probs_mod if probs_edits else None)

    def _output_mods(self, output: Tensor, count: int | None = None, rows: Tensor | None = None) -> Tensor:
        for edit in self.edits[:count]:
            if edit.stage == "output":
                output = _rows_only(edit, self.call, rows, edit.output_mod_at(output, rows, self.call), output)
        return output

    def _blocked(self, count: int, *, rows: Tensor | None = None, on_block: Callable[[BlockView], None] | None = None
                 ) -> Tensor:
        logits_mod, probs_mod = self.hooks(count)
        output = blocked_attention(self.query, self.key, self.value, self.keeps[count], scale=self.scale,
                                   softcap=self.softcap, block_size=self.block_size, query_index=rows,
                                   on_block=on_block, logits_mod=logits_mod, probs_mod=probs_mod)
        return self._output_mods(output, count, rows)

    def eager(self, on_block: Callable[[BlockView], None] | None = None, rows: Tensor | None = None) -> Tensor:
        """Per-head output (B, Hq, Lq|n, Dv) from the blocked kernel with every edit."""
        return self._blocked(len(self.edits), rows=rows, on_block=on_block)

    # the fast form -----------------------------------------------------------------------------------------
    def fast(self, sdpa: SdpaFn) -> Tensor:
        """Per-head output (B, Hq, Lq, Dv) from one SDPA call; only when ``is_fast()``."""
        query, key, value = self.query, self.key, self.value
        for edit in self.edits:
            if edit.stage != "logits":
                continue
            factor = edit.query_scale(self.call)
            if factor is not None:
                query = query * factor.to(query.dtype)
            bias = edit.key_bias(self.call)
            if bias is not None and bool(bias[0].any()):  # a zero bias is skipped: the identity stays bit-exact
                coef, indicator = bias
                B, Hq, Lq, _ = query.shape
                query_column = (coef.to(query.dtype) / self.scale).view(1, Hq, 1, 1).expand(B, Hq, Lq, 1)
                key_column = indicator.to(key.dtype)[:, None, :, None].expand(-1, key.shape[1], -1, 1)
                query = torch.cat([query, query_column], dim=-1)
                key = torch.cat([key, key_column], dim=-1)
                value = torch.cat([value, value.new_zeros(*value.shape[:3], 1)], dim=-1)
        keep = self.keep if self.mask_changed else None
        output = sdpa(query, key, value, keep)[..., : self.value.shape[-1]]
        if keep is not None:  # rows with no visible key: zeros (SDPA may give NaN there)
            output = torch.where(keep.any(dim=-1, keepdim=True), output, torch.zeros((), dtype=output.dtype))
        return self._after_attention(output)

    def _after_attention(self, output: Tensor) -> Tensor:
        """The probs edits' fast forms and the output edits, in order, on a fused kernel's output."""
        for edit in self.edits:
            if edit.stage == "probs":
                output = edit.fast_output(output, self.value, self.keep, self.call)
            elif edit.stage == "output":
                output = edit.output_mod_at(output, None, self.call)
        return output

    def flex(self) -> Tensor:
        """Per-head output (B, Hq, Lq, Dv) from compiled FlexAttention with the logits edits as one score_mod and
        the mask as a block mask; only when ``flex_ready()``. The first call per shape compiles (seconds)."""
        from attnlab.functional.masked_attention import masked_attention
        from attnlab.functional.masks import from_keep

        mods = [edit.as_score_mod(self.call) for edit in self.edits if edit.stage == "logits"]

        def score_mod(logits: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            for mod in mods:
                logits = mod(logits, b, h, q_idx, kv_idx)
            return logits

        mask_mod = None if self.keep is None else from_keep(self.keep.contiguous())
        output = masked_attention(self.query, self.key, self.value, mask_mod, score_mod=score_mod if mods else None,
                                  scale=self.scale, path="flex", compiled=True)
        return self._after_attention(output)

    # verification ------------------------------------------------------------------------------------------
    def verify(self, records: dict[int, EditRecord], rows_wanted: int) -> None:
        """Update each edit's record: calls and heads touched, and the max output change on sampled rows."""
        query_valid = self.call.query_valid
        rows = _spread_rows(query_valid, rows_wanted, self.query.device)
        valid = query_valid[:, rows].to(self.query.device)[:, None, :, None]  # (B, 1, n, 1)
        previous = self._blocked(0, rows=rows)
        for k, edit in enumerate(self.edits, start=1):
            record = records.setdefault(id(edit), EditRecord())
            record.count_call(edit, self.call)
            current = self._blocked(k, rows=rows)
            change = (current.double() - previous.double()).abs()
            change = change.masked_fill(~(valid & edit.head_column(self.call).to(valid.device)), 0.0)
            if change.numel():
                record.max_change = max(record.max_change, float(change.max()))
            previous = current


def _spread_rows(query_valid: Tensor, wanted: int, device: torch.device) -> Tensor:
    """Up to ``wanted`` query rows evenly spread over the rows that are real in at least one sequence."""
    candidates = query_valid.any(dim=0).nonzero().flatten().to(device)
    if candidates.numel() == 0:
        candidates = torch.arange(query_valid.shape[1], device=device)
    if candidates.numel() <= wanted:
        return candidates
    picks = torch.linspace(0, candidates.numel() - 1, wanted, device=device).round().long().unique()
    return candidates[picks]
