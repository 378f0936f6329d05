"""MODA key alignment (Zhang et al. 2025, METHODS.md #32): group-1 keys mapped into group 0's key/value basis.

Reconstructed from the released code (KwaiVGI/MODA ``modeling_llama_local_moda.py``; medium confidence). The
per-group mask is :func:`attnlab.functional.sparse_masks.groups`; the layer is ``attnlab.layers.moda``.

Shape legend: B batch, Hkv num_kv_heads, T seq_len, D head_dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.functional.masks import MaskMod, with_covered_lengths, with_name

__all__ = ["align_keys", "groups_of_roles", "real_keys"]


def groups_of_roles(codes: Tensor, aligned: tuple[int, ...], pad: int = 0) -> tuple[Tensor, Tensor]:
    """MODA's modality flags from token role codes (:data:`attnlab.roles.ROLES`).

    Args:
        codes: (B, T) integer role codes. aligned: the codes of the aligned group (the image role for MODA's
            visual tokens). pad: the padding code.
    Returns:
        group_ids (B, T) long (1 = aligned, 0 = the rest, padding included) and basis (B, T) bool: the real
        group-0 tokens (text, system, generated), whose keys and values build the text basis.
    """
    in_aligned = torch.isin(codes, torch.tensor(aligned, dtype=codes.dtype, device=codes.device))
    return in_aligned.long(), ~in_aligned & (codes != pad)


def real_keys(valid: Tensor) -> MaskMod:
    """A mask_mod that hides padding keys: keep (b, q, kv) iff token kv of sequence b is real, or query q is padding
    (a padded row keeps its keys, so no row is empty; its output is never used).

    Args:
        valid: (B, T) bool, the real tokens; absolute positions index its second axis (calls past T raise
            ShapeError through ``masks.check_lengths``).
    """
    real, last = valid.bool(), valid.shape[1] - 1

    def mask_mod(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        table = real.to(q_idx.device)
        return table[batch_idx, kv_idx.clamp(0, last)] | ~table[batch_idx, q_idx.clamp(0, last)]

    with_covered_lengths(mask_mod, last + 1, last + 1)
    return with_name(mask_mod, "real_keys")


def align_keys(key: Tensor, value: Tensor, group_ids: Tensor, gain: Tensor, fuse: Callable[[Tensor], Tensor],
               eps: float = 1e-6, *, causal: bool = False, basis: Tensor | None = None) -> Tensor:
    """MODA key alignment: group-1 keys ← W_fuse(K + r ⊙ K̂ G_t), with G_t = normalise_rows(K̂_tᵀ V_t).

    Args:
        key, value: (B, Hkv, T, D). group_ids: (B, T) long, 0 = text, 1 = aligned group.
        gain: r (D,), zeros at init. fuse: W_fuse, a D × D linear map (e.g. an ``nn.Linear``; identity at init).

    Returns:
        key (B, Hkv, T, D) with only group-1 rows changed. K̂ = K / (‖K‖ + eps) per token. ``basis``: (B, T)
        bool, the tokens whose keys and values build G_t (default ``group_ids == 0``; pass the real group-0 tokens
        to keep padding out of it). ``causal=False``: G_t
        sums over all of the sample's group-0 tokens (as in the released code; a key then depends on later tokens).
        ``causal=True``: the key at position p uses the prefix basis over group-0 tokens ≤ p (memory B·Hkv·T·D²),
        so a causal mask stays causal.
    """
    unit = key / (key.norm(dim=-1, keepdim=True) + eps)  # (B, Hkv, T, D)
    text = ((group_ids == 0) if basis is None else basis.bool()).to(key.dtype)[:, None, :, None]  # (B, 1, T, 1)
    if causal:
        outer = (unit * text)[..., :, None] * value[..., None, :]  # (B, Hkv, T, D, D): k̂_jᵀ v_j
        basis = F.normalize(outer.cumsum(dim=2), dim=-1, eps=eps)  # (B, Hkv, T, D, D), prefix sums
        aligned = (unit[..., None, :] @ basis).squeeze(-2)  # (B, Hkv, T, D)
    else:
        basis = F.normalize((unit * text).transpose(-1, -2) @ value, dim=-1, eps=eps)  # (B, Hkv, D, D)
        aligned = unit @ basis
    fused = fuse(key + gain * aligned)
    return torch.where((group_ids == 1)[:, None, :, None], fused, key)
