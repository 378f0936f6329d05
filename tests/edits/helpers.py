"""Direct drivers for edit tests: contexts over constructed query/key/value, no model needed."""

from __future__ import annotations

import torch

from attnlab.edits.apply import EditedCall, order_edits
from attnlab.edits.base import EditContext
from attnlab.functional.attention import causal_keep


def make_context(edit, B, Hq, Hkv, Lq, Lk, *, scale, valid=None, layer_idx=0):
    """EditContext for a causal call whose queries are the last Lq of Lk tokens; ``valid`` (B, Lk) marks real
    tokens (left padding), positions count real tokens only."""
    valid = torch.ones(B, Lk, dtype=torch.bool) if valid is None else valid
    positions = torch.where(valid, valid.long().cumsum(-1) - 1, torch.full_like(valid, -1, dtype=torch.long))
    return EditContext(layer_idx=layer_idx, num_heads=Hq, num_kv_heads=Hkv, q_len=Lq, kv_len=Lk,
                       query_positions=positions[:, Lk - Lq:], key_positions=positions,
                       query_valid=valid[:, Lk - Lq:], key_valid=valid,
                       heads=edit.head_selection(Hq, torch.device("cpu")), scale=scale)


def edited_call(edits, query, key, value, *, valid=None, block_size=5):
    B, Hq, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    keep = causal_keep(Lq, Lk)[None, None]
    if valid is not None:
        keep = keep & valid[:, None, None, :]
    edits = order_edits(edits)
    scale = D ** -0.5
    contexts = [make_context(e, B, Hq, Hkv, Lq, Lk, scale=scale, valid=valid) for e in edits]
    return EditedCall(query, key, value, keep, edits=edits, contexts=contexts, scale=scale, block_size=block_size)


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
