"""Hand-built attention call records and blocks for the maps tests (RefAM, A-STAR, ProfilingDiT probes/edits)."""

from __future__ import annotations

import dataclasses

import torch

from attnlab.functional.attention import BlockView
from attnlab.probes.base import AttentionCall, SequenceInfo


def call_record(query_roles: torch.Tensor, key_roles: torch.Tensor, *, layer: int = 0, heads: int = 2,
                step: int | None = None, kind: str | None = None, grid: tuple[int, int, int] | None = None
                ) -> AttentionCall:
    """An AttentionCall over B × Lq queries and B × Lk keys with the given role codes (all tokens real).
    ``step``/``kind``/``grid`` are passed when the record has those fields (the diffusion core adds them)."""
    B, Lq = query_roles.shape
    Lk = key_roles.shape[1]
    names = {f.name for f in dataclasses.fields(AttentionCall)}
    extra = {k: v for k, v in (("step", step), ("kind", kind), ("grid", grid)) if k in names}
    valid_k = torch.ones(B, Lk, dtype=torch.bool)
    return AttentionCall(
        layer_idx=layer, num_heads=heads, num_kv_heads=heads, q_len=Lq, kv_len=Lk, causal=False, scale=1.0,
        value=torch.zeros(B, heads, Lk, 1), query_valid=torch.ones(B, Lq, dtype=torch.bool), key_valid=valid_k,
        query_positions=torch.arange(Lq).expand(B, Lq), key_positions=torch.arange(Lk).expand(B, Lk),
        sequence=SequenceInfo.from_mask(valid_k, None, 0), query_roles=query_roles.to(torch.int8),
        key_roles=key_roles.to(torch.int8), **extra)


def blocks(probs: torch.Tensor, size: int) -> list[BlockView]:
    """The probs (B, H, Lq, Lk) cut into query blocks of ``size`` rows, as the blocked kernel hands them out."""
    out = []
    for start in range(0, probs.shape[2], size):
        index = torch.arange(start, min(start + size, probs.shape[2]))
        part = probs[:, :, index]
        out.append(BlockView(probs=part, logits=part.log(), keep=None, q_index=index))
    return out
