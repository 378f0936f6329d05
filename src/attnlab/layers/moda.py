"""MODA — MOdular Duplex Attention (Zhang et al. 2025, METHODS.md #32): key alignment across two token groups.

Reconstructed from the released code (key alignment, medium confidence) and the abstract (per-group masking, low
confidence): group 0 = the "text" modality (its keys and values define the basis), group 1 = the other modality
(e.g. visual tokens), whose keys are aligned into the text space before an ordinary softmax attention.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.masks import MaskMod, and_masks, to_dense
from attnlab.functional.moda import align_keys, groups_of_roles, real_keys
from attnlab.functional.sparse_masks import groups
from attnlab.layers import LAYERS
from attnlab.layers._common import merge_heads
from attnlab.layers._softmax_base import SoftmaxFamilyAttention
from attnlab.layers.base import DEFAULT_NUM_HEADS
from attnlab.roles import PAD, TokenRoles, current_given_roles, role_codes


@LAYERS.register("moda")
class DuplexAttention(SoftmaxFamilyAttention):
    """MODA duplex attention: align group-1 keys into group-0's key/value basis, then masked softmax attention.

    ``forward(hidden_states, *, group_ids=None, roles=None)``: group_ids (B, T) in {0, 1}; or ``roles``, the token
    roles (a :class:`attnlab.roles.TokenRoles` or its (B, T) codes), whose ``aligned_roles`` (default image) form
    group 1 and whose other real tokens form the text basis; with neither, the roles of an enclosing
    :func:`attnlab.roles.given_roles` block when their shape is (B, T); else all group 0 (plain attention).
    Padding: with roles, padding stays out of the text basis and no query attends a padding key
    (:func:`attnlab.functional.moda.real_keys`), so the padding's content never reaches a real token. The RoPE
    positions still count the padding (the layer has one position offset per call, not per row), and the aligned
    term ``r ⊙ K̂ G_t`` carries no rotation, so a left-padded row is **not** the same tokens alone: it matches them
    only without padding. With ``group_ids`` the layer knows no padding at all.
    ``allowed`` (2, 2) bool says which groups see which (default all); it is ANDed with the layer mask.
    ``causal_basis``: build the alignment basis from group-0 tokens up to each key's position (see
    :func:`attnlab.functional.moda.align_keys`); None (default) = True iff the layer mask hides every later key
    (checked on 16 positions), so the default causal layer stays causal; False = the released code's whole-sequence basis (bidirectional).
    Args otherwise as in ``MaskedAttention``. Source: KwaiVGI/MODA ``modeling_llama_local_moda.py`` (METHODS.md #32).
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, allowed: Tensor | None = None, mask_mod: MaskMod | None = None,
                 path: Literal["dense", "flex"] = "dense", compiled: bool = False,
                 rope_base: float | None = 10000.0, causal_basis: bool | None = None,
                 aligned_roles: tuple[str, ...] = ("image",)) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod, path=path,
                         compiled=compiled, rope_base=rope_base)
        self.gain = nn.Parameter(torch.zeros(self.head_dim))
        self.fuse = nn.Linear(self.head_dim, self.head_dim, bias=False)
        with torch.no_grad():
            self.fuse.weight.copy_(torch.eye(self.head_dim))
        allowed = torch.ones(2, 2, dtype=torch.bool) if allowed is None else allowed
        if allowed.shape != (2, 2) or allowed.dtype != torch.bool:
            raise ShapeError(f"expected allowed as a (2, 2) bool table, got {allowed.dtype} {tuple(allowed.shape)}")
        self.register_buffer("allowed", allowed, persistent=False)
        if causal_basis is None:
            try:
                probe = to_dense(self.mask_mod, 1, num_heads, 16, 16)
                causal_basis = not bool(probe.triu(1).any())
            except ShapeError:  # a table built for another length: assume causal (the safe choice)
                causal_basis = True
        self.causal_basis = causal_basis
        self.aligned_roles = tuple(aligned_roles)
        self._aligned_codes = role_codes(self.aligned_roles)

    def _groups(self, hidden_states: Tensor, group_ids: Tensor | None,
                roles: TokenRoles | Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(group_ids, basis) from explicit group ids, explicit roles or the given roles (see the class doc)."""
        if group_ids is not None and roles is not None:
            raise ConfigError("moda takes group_ids or roles, not both")
        if group_ids is not None:
            return group_ids, None
        explicit = roles is not None
        if roles is None:
            roles = current_given_roles()
        codes = roles.codes if isinstance(roles, TokenRoles) else roles
        if codes is None or (not explicit and tuple(codes.shape) != tuple(hidden_states.shape[:2])):
            return None, None
        if tuple(codes.shape) != tuple(hidden_states.shape[:2]):
            raise ShapeError(f"expected roles {tuple(hidden_states.shape[:2])}, got {tuple(codes.shape)}")
        return groups_of_roles(codes.to(hidden_states.device), self._aligned_codes, PAD)

    def forward(self, hidden_states: Tensor, *, state: None = None, position_offset: int = 0,
                group_ids: Tensor | None = None, roles: TokenRoles | Tensor | None = None) -> tuple[Tensor, None]:
        """hidden_states (B, T, C); group_ids (B, T) long or None; roles (TokenRoles or (B, T) codes) or None;
        state must be None. Returns (output (B, T, C), None)."""
        q, k, v, _ = self.project(hidden_states, self.start_position(state, position_offset))
        mask_mod = None
        group_ids, basis = self._groups(hidden_states, group_ids, roles)
        if group_ids is not None:
            if group_ids.shape != hidden_states.shape[:2]:
                raise ShapeError(f"expected group_ids {tuple(hidden_states.shape[:2])}, got {tuple(group_ids.shape)}")
            k = align_keys(k, v, group_ids, self.gain, self.fuse, causal=self.causal_basis, basis=basis)
            mask_mod = groups(group_ids, self.allowed)  # chunk-local; softmax_attend ANDs the layer mask
            if basis is not None:  # roles: padding keys hidden too (real = the text basis + the aligned group)
                mask_mod = and_masks(mask_mod, real_keys(basis | (group_ids == 1)))
        o = self.softmax_attend(q, k, v, mask_mod=mask_mod)
        return self.o_proj(merge_heads(o.to(hidden_states.dtype))), None


__all__ = ["DuplexAttention"]
