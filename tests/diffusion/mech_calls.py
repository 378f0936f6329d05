"""Hand-built diffusion attention calls for the mechanism tests (radial, ultravico, sparsed, block-sparse path).

``diffusion_call`` builds an AttentionCall with the diffusion fields (``grid``, ``kind``, ``step``, ``block``) for a
self, joint (text first or last) or cross call.
"""

from __future__ import annotations

import torch

from attnlab.edits.apply import EditedCall, order_edits
from attnlab.probes.base import AttentionCall, Probe, SequenceInfo
from attnlab.roles import IMAGE, TEXT



def roles(grid, text=0, text_first=False, batch=1):
    """(B, L) int8 role codes: the grid's patch tokens and ``text`` text tokens (first or last)."""
    patches = [IMAGE] * (grid[0] * grid[1] * grid[2])
    codes = [TEXT] * text + patches if text_first else patches + [TEXT] * text
    return torch.tensor(codes, dtype=torch.int8).expand(batch, -1).contiguous()


def diffusion_call(grid, *, heads=2, head_dim=4, text=0, text_first=False, kind="self", step=None, block=None,
                   layer_idx=0, batch=1, seed=0, dtype=torch.float64):
    """(call, query, key, value) of a bidirectional diffusion call.

    ``kind``: "self" (patches only; ``text`` must be 0), "joint" (patches and ``text`` text tokens, in one sequence)
    or "cross" (patch queries, ``text`` text keys)."""
    g = torch.Generator().manual_seed(seed)
    q_roles = roles(grid, text if kind == "joint" else 0, text_first, batch)
    k_roles = torch.full((batch, text), TEXT, dtype=torch.int8) if kind == "cross" else q_roles
    Lq, Lk = q_roles.shape[1], k_roles.shape[1]
    query = torch.randn(batch, heads, Lq, head_dim, generator=g, dtype=dtype)
    key = torch.randn(batch, heads, Lk, head_dim, generator=g, dtype=dtype)
    value = torch.randn(batch, heads, Lk, head_dim, generator=g, dtype=dtype)
    q_valid, k_valid = torch.ones(batch, Lq, dtype=torch.bool), torch.ones(batch, Lk, dtype=torch.bool)
    sequence = SequenceInfo.from_mask(q_valid, None, 0)
    k_positions = torch.arange(Lk).expand(batch, Lk)
    call = AttentionCall(layer_idx=layer_idx, num_heads=heads, num_kv_heads=heads, q_len=Lq, kv_len=Lk, causal=False,
                    scale=head_dim ** -0.5, value=value, query_valid=q_valid, key_valid=k_valid,
                    query_positions=sequence.positions, key_positions=k_positions, sequence=sequence,
                    query_roles=q_roles, key_roles=k_roles, step=step, kind=kind, grid=tuple(grid), block=block)
    return call, query, key, value


def edited(edits, call, query, key, value, block_size=5):
    """The EditedCall of ``edits`` on a hand-built call (the model applies no mask of its own)."""
    return EditedCall(query, key, value, None, edits=order_edits(edits), call=call, block_size=block_size)


def captured_logits(edited_call):
    """(B, H, Lq, Lk) logits after the edits' logits stage, from the blocked kernel's block views."""
    B, H, Lq, Lk = edited_call.shape
    out = torch.full((B, H, Lq, Lk), float("nan"), dtype=torch.float64)

    def grab(block):
        out[:, :, block.q_index, : block.logits.shape[-1]] = block.logits.double()

    edited_call.eager(on_block=grab)
    return out


class BlockRecorder(Probe):
    """Keeps, per layer, the last call record and its full keep mask and (edited) logits from the blocked kernel."""

    name = "block_recorder"
    needs = frozenset({"probs"})

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.keeps, self.logits = {}, {}, {}

    def begin_call(self, call):
        B, H, Lq, Lk = call.batch, call.num_heads, call.q_len, call.kv_len
        self.calls[call.layer_idx] = call
        self.keeps[call.layer_idx] = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
        self.logits[call.layer_idx] = torch.full((B, H, Lq, Lk), float("nan"), dtype=torch.float64)

    def update(self, call, block):
        width = block.probs.shape[-1]
        keep = torch.ones_like(block.probs, dtype=torch.bool) if block.keep is None else block.keep
        self.keeps[call.layer_idx][:, :, block.q_index, :width] = keep.expand_as(block.probs)
        self.keeps[call.layer_idx][:, :, block.q_index, width:] = False
        self.logits[call.layer_idx][:, :, block.q_index, :width] = block.logits.double()
