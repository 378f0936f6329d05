"""Direct drivers for edit tests: call records over constructed query/key/value, no model needed."""

from __future__ import annotations

import torch

from attnlab.edits.apply import EditedCall, order_edits
from attnlab.edits.base import AttentionCall
from attnlab.functional.attention import causal_keep
from attnlab.probes.base import SequenceInfo


def make_call(value, Hq, Lq, *, scale, valid=None, layer_idx=0):
    """AttentionCall for a causal call whose queries are the last Lq of Lk tokens; ``valid`` (B, Lk) marks real
    tokens (left padding), positions count real tokens only."""
    B, Hkv, Lk, _ = value.shape
    valid = torch.ones(B, Lk, dtype=torch.bool) if valid is None else valid
    sequence = SequenceInfo.from_mask(valid, None, 0)
    positions = sequence.positions
    return AttentionCall(layer_idx=layer_idx, num_heads=Hq, num_kv_heads=Hkv, q_len=Lq, kv_len=Lk, causal=True,
                         scale=scale, value=value, query_valid=valid[:, Lk - Lq:], key_valid=valid,
                         query_positions=positions[:, Lk - Lq:], key_positions=positions, sequence=sequence)


def edited_call(edits, query, key, value, *, valid=None, block_size=5):
    B, Hq, Lq, D = query.shape
    Lk = key.shape[2]
    keep = causal_keep(Lq, Lk)[None, None]
    if valid is not None:
        keep = keep & valid[:, None, None, :]
    call = make_call(value, Hq, Lq, scale=D ** -0.5, valid=valid)
    return EditedCall(query, key, value, keep, edits=order_edits(edits), call=call, block_size=block_size)


def sdpa_fn(scale):
    def sdpa(query, key, value, keep):
        # equal head dims keep SDPA on its fused kernels (unequal ones fall back to the O(L²) math kernel)
        assert query.shape[-1] == key.shape[-1] == value.shape[-1], (query.shape, key.shape, value.shape)
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1)
        v = value.repeat_interleave(groups, dim=1)
        if keep is None:
            keep = causal_keep(query.shape[2], key.shape[2])[None, None]
        return torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=keep, scale=scale)
    return sdpa


def capture_probs(call):
    """Run the eager form and return its full probs (B, Hq, Lq, Lk), padded with zeros past each block's width."""
    B, Hq, Lq, Lk = call.shape
    probs = torch.zeros(B, Hq, Lq, Lk, dtype=torch.float64)

    def grab(block):
        probs[:, :, block.q_index, : block.probs.shape[-1]] = block.probs.double()

    call.eager(on_block=grab)
    return probs


def qkv(B=2, Hq=4, Hkv=2, L=11, D=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, L, D, generator=g, dtype=dtype), torch.randn(B, Hkv, L, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, L, D, generator=g, dtype=dtype))
