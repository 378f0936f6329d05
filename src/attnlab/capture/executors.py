"""The executors: one function per :class:`~attnlab.capture.planner.Path`, each running one attention call.

Every executor takes a :class:`Job` and returns the output (B, Lq, Hq, Dv) transformers expects. SDPA is
transformers' own ``sdpa_attention_forward`` (so the plain path is bit-identical to ``attn_implementation="sdpa"``);
the blocked kernel is :func:`attnlab.functional.attention.blocked_attention` (``blocked_eager``), and the fused
kernel :func:`attnlab.functional.fused_attention.fused_attention` (``fused``) runs instead when every probe that
reads probabilities supports it (:func:`fused_plan`) and the call allows it (:func:`fused_fallback`): the default;
``Session(probe_kernel="blocked")`` keeps the blocked kernel, the oracle. The edit forms are those of
:class:`attnlab.edits.apply.EditedCall`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from attnlab.capture.block_sparse_path import block_sparse_edits
from attnlab.capture.calls import sample_rows
from attnlab.capture.planner import Path
from attnlab.edits.apply import EditedCall
from attnlab.functional.attention import BlockView, blocked_attention
from attnlab.functional.fused_attention import FusedRequest, FusedStats, fused_attention
from attnlab.probes.base import AttentionCall, Probe


@dataclass
class Job:
    """One attention call, ready to run.

    Attributes:
        module: the attention module transformers passed. query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value
            (B, Hkv, Lk, Dv), attention_mask and kwargs: as transformers passed them (empty cache slots dropped).
        keep: the bool keep mask SDPA would apply (None = all visible). call: the call record.
        observe: feeds one BlockView to the probes that need probs, or None when none does.
        block_size: query rows per block. query_fraction: share of query rows the sampled paths compute.
        edited: the call under this layer's edits, or None without edits.
        fused: the fused-kernel plan of the call (:func:`fused_plan`), or None to run the blocked kernel.
    """

    module: Any
    query: Tensor
    key: Tensor
    value: Tensor
    attention_mask: Tensor | None
    kwargs: dict[str, Any]
    keep: Tensor | None
    call: AttentionCall
    observe: Callable[[BlockView], None] | None
    block_size: int
    query_fraction: float
    edited: EditedCall | None = None
    fused: FusedPlan | None = None

    def sdpa(self) -> Tensor:
        """(B, Lq, Hq, Dv) from transformers' SDPA function with the model's own mask."""
        return sdpa_attention_forward(self.module, self.query, self.key, self.value, self.attention_mask,
                                      **self.kwargs)[0]

    def sdpa_with(self, query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None) -> Tensor:
        """(B, Hq, Lq, Dv) from SDPA on edited tensors (``keep`` None = the model's own mask); EditedCall's SdpaFn."""
        mask = self.attention_mask if keep is None else keep
        options = {**self.kwargs, "scaling": self.call.scale}
        return sdpa_attention_forward(self.module, query, key, value, mask, **options)[0].transpose(1, 2)

    def rows(self) -> Tensor:
        """(n,) long: the query rows probes see on a sampled path, about ``query_fraction`` of the ``Lq`` rows (at
        least 2), evenly spread with the first and last included (:func:`attnlab.capture.calls.sample_rows`)."""
        return sample_rows(self.query.shape[2], self.query_fraction, self.query.device)


def _heads_last(output: Tensor) -> Tensor:
    return output.transpose(1, 2).contiguous()  # (B, Hq, Lq, Dv) -> (B, Lq, Hq, Dv)


def _sdpa_sampled(job: Job) -> Tensor:
    output = job.sdpa()
    with torch.no_grad():
        blocked_attention(job.query, job.key, job.value, job.keep, scale=job.call.scale, block_size=job.block_size,
                          query_index=job.rows(), on_block=job.observe)
    return output


def _fused(job: Job) -> Tensor:
    output, stats = fused_attention(job.query, job.key, job.value, job.keep, job.fused.request,
                                    scale=job.call.scale, block_size=job.block_size)
    job.fused.deliver(stats)
    return _heads_last(output)


def _blocked(job: Job) -> Tensor:
    return _heads_last(blocked_attention(job.query, job.key, job.value, job.keep, scale=job.call.scale,
                                         softcap=job.kwargs.get("softcap"), block_size=job.block_size,
                                         on_block=job.observe))


def fused_fallback(job: Job) -> str | None:
    """Why a ``blocked_eager`` call with a fused plan cannot run the fused kernel, or None if it can: the logits are
    soft-capped, or a gradient flows through the attention (the fused kernel is not differentiable)."""
    if job.kwargs.get("softcap") is not None:
        return "the model soft-caps its logits"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (job.query, job.key, job.value)):
        return "a gradient flows through the attention"
    return None


def _edits_sdpa_sampled(job: Job) -> Tensor:
    output = job.edited.fast(job.sdpa_with)
    with torch.no_grad():
        job.edited.eager(on_block=job.observe, rows=job.rows())
    return _heads_last(output)


EXECUTORS: dict[Path, Callable[[Job], Tensor]] = {
    Path.SDPA: Job.sdpa,
    Path.SDPA_SAMPLED: _sdpa_sampled,
    Path.BLOCKED_EAGER: _blocked,
    Path.FUSED: _fused,
    Path.SDPA_EDITS: lambda job: _heads_last(job.edited.fast(job.sdpa_with)),
    Path.SDPA_EDITS_SAMPLED: _edits_sdpa_sampled,
    Path.FLEX_EDITS: lambda job: _heads_last(job.edited.flex()),
    Path.BLOCKED_EAGER_EDITS: lambda job: _heads_last(job.edited.eager(on_block=job.observe)),
    Path.BLOCK_SPARSE_EDITS: block_sparse_edits,
}


@dataclass
class FusedPlan:
    """What the fused kernel computes for one call, and the probes that receive it.

    Attributes:
        request: the union of the probes' :class:`attnlab.functional.fused_attention.FusedRequest`.
        call: the call record. readers: the probes that need probs (each returned a request and implements
            :meth:`attnlab.probes.base.Probe.update_fused`).
    """

    request: FusedRequest
    call: AttentionCall
    readers: list[Any]

    def deliver(self, stats: FusedStats) -> None:
        """Hand the call's statistics to every reader (instead of their per-block ``update``)."""
        with torch.no_grad():
            for probe in self.readers:
                probe.update_fused(self.call, stats)


def fused_plan(call: AttentionCall, probes: list[Probe]) -> FusedPlan | None:
    """The fused-kernel plan of a call, or None when the blocked kernel (the oracle) must run: no probe needs probs,
    a probe that does has no fused form or declines this call (its :meth:`attnlab.probes.base.Probe.fused_request`
    returns None, the default), or two probes ask for the same reduction with different weights. The session runs
    the plan only on a ``blocked_eager`` call that :func:`fused_fallback` allows (recorded as path ``fused``);
    edits and query sampling never reach the fused kernel."""
    readers = [probe for probe in probes if "probs" in probe.needs]
    if not readers:
        return None
    request: FusedRequest | None = FusedRequest()
    for probe in readers:
        mine = probe.fused_request(call)
        request = None if mine is None or request is None else request.merged(mine)
        if request is None:
            return None
    return FusedPlan(request=request, call=call, readers=readers)


def probe_observer(call: AttentionCall, probes: list[Any]) -> Callable[[BlockView], None] | None:
    """Feed each block (detached, without gradient) to the probes that need probs; None if none does. NaN rows
    (:attr:`attnlab.functional.attention.BlockView.nan_rows`) are masked out except for probes that count them."""
    readers = [probe for probe in probes if "probs" in probe.needs]
    if not readers:
        return None

    def observe(block: BlockView) -> None:
        detached = BlockView(probs=block.probs.detach(), logits=block.logits.detach(), keep=block.keep,
                             q_index=block.q_index)
        with torch.no_grad():
            for probe in readers:
                # rows that became NaN reach only probes that count them (entropy's nan_rows); every other probe
                # sees them as rows with no visible key, so a NaN row never enters a statistic as a value
                probe.update(call, detached if probe.counts_nan_rows else detached.without_nan_rows())

    return observe


def observe_implied(attention_map: Any, call: AttentionCall, probes: list[Any], block_size: int) -> None:
    """Run the probes over an implied attention map (an :class:`attnlab.functional.implied.ImpliedMap`):
    ``begin_call``, each of ``attention_map.blocks(block_size)`` to the probes that need probs, ``end_call``."""
    observe = probe_observer(call, probes)
    with torch.no_grad():
        for probe in probes:
            probe.begin_call(call)
        if observe is not None:
            for block in attention_map.blocks(block_size):
                observe(block)
        for probe in probes:
            probe.end_call(call)
