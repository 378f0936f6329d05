"""Shared projections of the softmax-family layers (masked, gated, sigmoid/ReLU, σReparam, DMA, MODA, decay).

A layer maps hidden_states (B, T, C) to (output (B, T, C), None): q/k/v projections, optional RoPE, an attention
function over (B, H, T, D) heads, and an output projection. Subclasses override :meth:`attend` (and, if they need
extra projections, ``__init__``). ``forward`` returns a tuple so that softmax-family and linear-attention layers share
one calling convention, the layer protocol (``layers/base.py``); these layers keep no recurrent state (no KV cache),
so the returned state is None and a non-None ``state`` raises ConfigError.

Masks: ``mask_mod=None`` means causal; pass ``attnlab.functional.masks.full()`` for bidirectional attention.
Positions: ``forward(hidden_states, position_offset=p)`` places the chunk at absolute positions p … p + T − 1 (no KV
cache): RoPE, the layer's mask and the layer's own score_mod all see those positions on both axes (:meth:`layer_mask`,
:meth:`at_positions`), so absolute-position masks (sinks, radial, tables) stay aligned. Per-call masks built from
the chunk itself (DMA's top-w, MODA's groups) use chunk-local positions.
Paths: ``path="dense"`` (SDPA with the materialised mask; trains on CPU; the default), ``path="flex"`` (FlexAttention
with a block mask cached per length in the layer; inference only; ``compiled=True`` for the fused kernel) or
``path="block"`` (block-gather SDPA on the kept tiles, :mod:`attnlab.functional.block_sparse`, with its plan cached
per length in the same ``block_masks`` cache; differentiable; the fast path for sparse masks on CPU).

Per-call ``keep`` (the one convention of every layer whose ``forward`` takes ``keep=``, e.g. ``object_attention``
and ``decoupled``): a bool tensor, True = may attend, in chunk-local positions, ANDed with the layer mask. Forms:
(Lq, Lk) for every sequence and head, (B, Lq, Lk) per sequence, or 4-D broadcastable to (B, H, Lq, Lk) (each axis
its full size or 1). :func:`check_keep` is its one validator (ShapeError otherwise).
Recorded probs: :meth:`SoftmaxFamilyAttention.dense_probs` gives a call's probs as float32, detached, with rows that
see no key 0 (never NaN); layers that keep probs for apps (``last_probs``, ``attention_probs``) use it.

Shape legend: B batch, T seq_len, C hidden_size, H num_heads, Hkv num_kv_heads, D head_dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.implied import softmax_map
from attnlab.functional.masked_attention import BlockMaskCache, ScoreMod, masked_attention, shift_score_mod
from attnlab.functional.masks import MaskMod, and_masks, causal, check_num_heads, shift_positions, to_dense
from attnlab.functional.positions import rotary
from attnlab.layers._common import PositiveInt, check_arg, check_heads, check_hidden, merge_heads, split_heads
from attnlab.layers.base import DEFAULT_NUM_HEADS, Layer

Linear = Callable[[int, int], nn.Module]


def check_keep(keep: Tensor, shape: tuple[int, int, int, int], device: torch.device | None = None) -> Tensor:
    """A per-call keep (module docstring) as bool (B|1, H|1, Lq|1, Lk|1) on ``device``; ``shape`` is (B, H, Lq, Lk).

    (Lq, Lk) becomes (1, 1, Lq, Lk) and (B, Lq, Lk) becomes (B, 1, Lq, Lk); not expanded further (from_keep and
    ``&`` broadcast). Raises ShapeError unless keep is a 2-, 3- or 4-D bool tensor whose axes are their full size
    or 1.
    """
    B, H, Lq, Lk = shape
    forms = f"bool ({Lq}, {Lk}), ({B}, {Lq}, {Lk}) or broadcastable to ({B}, {H}, {Lq}, {Lk})"
    if not isinstance(keep, Tensor):
        raise ShapeError(f"expected keep as a {forms} tensor, got {type(keep).__name__}")
    got = f"{keep.dtype} {tuple(keep.shape)}"
    if keep.dtype != torch.bool or keep.dim() not in (2, 3, 4):
        raise ShapeError(f"expected keep as {forms}, got {got}")
    full = keep[None, None] if keep.dim() == 2 else keep[:, None] if keep.dim() == 3 else keep
    if any(n not in (1, size) for n, size in zip(full.shape, shape)):
        raise ShapeError(f"expected keep as {forms}, got {got}")
    return full.to(device) if device is not None else full


class SoftmaxFamilyAttention(Layer):
    """Base: projections + RoPE + ``attend`` + output projection (see the module docstring)."""

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, mask_mod: MaskMod | None = None,
                 path: Literal["dense", "flex", "block"] = "dense", compiled: bool = False,
                 rope_base: float | None = 10000.0, q_extra: int = 0, linear: Linear | None = None) -> None:
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.num_kv_heads = check_heads(hidden_size, num_heads, num_kv_heads)
        self.head_dim = check_arg(self, "head_dim", hidden_size // num_heads if head_dim is None else head_dim,
                                  PositiveInt)
        if path not in ("dense", "flex", "block"):
            raise ConfigError(f"expected path 'dense', 'flex' or 'block', got {path!r}")
        self.mask_mod = causal() if mask_mod is None else mask_mod
        check_num_heads(self.mask_mod, num_heads)
        self.path, self.compiled, self.rope_base = path, compiled, rope_base
        linear = linear or (lambda n_in, n_out: nn.Linear(n_in, n_out, bias=False))
        self.q_extra = q_extra
        self.q_proj = linear(hidden_size, num_heads * self.head_dim + q_extra)
        self.k_proj = linear(hidden_size, self.num_kv_heads * self.head_dim)
        self.v_proj = linear(hidden_size, self.num_kv_heads * self.head_dim)
        self.o_proj = linear(num_heads * self.head_dim, hidden_size)
        self.block_masks = BlockMaskCache()
        self._offset = 0  # position_offset of the current call, set by project()
        self._shifted: tuple[int, MaskMod, MaskMod] | None = None  # (offset, mask_mod, shifted mask) memo

    def project(self, hidden_states: Tensor, position_offset: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """query (B, H, T, D), key/value (B, Hkv, T, D) with RoPE applied, and the extra q_proj columns (B, T, q_extra)."""
        check_hidden(hidden_states, self.hidden_size)
        self._offset = position_offset  # positions of this call for layer_mask / at_positions
        projected = self.q_proj(hidden_states)
        q_part, extra = projected[..., : self.num_heads * self.head_dim], projected[..., self.num_heads * self.head_dim:]
        q = split_heads(q_part, self.num_heads)
        k = split_heads(self.k_proj(hidden_states), self.num_kv_heads)
        v = split_heads(self.v_proj(hidden_states), self.num_kv_heads)
        if self.rope_base is not None:
            q, k = rotary(q, position_offset, self.rope_base), rotary(k, position_offset, self.rope_base)
        return q, k, v, extra

    def layer_mask(self) -> MaskMod:
        """The layer's mask at this call's absolute positions (``position_offset`` from :meth:`project`)."""
        if self._offset == 0:
            return self.mask_mod
        if self._shifted is None or self._shifted[:2] != (self._offset, self.mask_mod):
            self._shifted = (self._offset, self.mask_mod, shift_positions(self.mask_mod, self._offset))
        return self._shifted[2]

    def at_positions(self, score_mod: ScoreMod | None) -> ScoreMod | None:
        """A layer-level score_mod (absolute positions) evaluated at this call's positions."""
        return shift_score_mod(score_mod, self._offset)

    def call_mask(self, mask_mod: MaskMod | None = None) -> MaskMod:
        """The mask of this call: the layer mask (:meth:`layer_mask`) ANDed with a per-call ``mask_mod`` if given."""
        return self.layer_mask() if mask_mod is None else and_masks(self.layer_mask(), mask_mod)

    def dense_probs(self, q: Tensor, k: Tensor, *, mask_mod: MaskMod | None = None,
                    score_mod: ScoreMod | None = None) -> Tensor:
        """The probs a :meth:`softmax_attend` call with these arguments weights the values by: float32
        (B, H, Lq, Lk), detached (no graph is built).

        q (B, H, Lq, D) and k (B, Hkv, Lk, D) as given to softmax_attend (rotated; any float dtype); ``mask_mod`` the
        per-call mask (ANDed with the layer mask, :meth:`call_mask`); ``score_mod`` as passed there. Computed here
        by :func:`attnlab.functional.implied.softmax_map`, not through a host hook. A row that sees no key is 0,
        never NaN. Memory O(B · H · Lq · Lk).
        """
        keep = to_dense(self.call_mask(mask_mod), q.shape[0], self.num_heads, q.shape[2], k.shape[2], device=q.device)
        with torch.no_grad():
            query, key = q.detach().float(), k.detach().float()
            # softmax_map expands GQA keys; the values are never read (only the probs), so one column is passed
            implied = softmax_map(query, key, key[..., :1], keep, scale=q.shape[-1] ** -0.5, score_mod=score_mod)
            return implied.dense()

    def dense_keep(self, q: Tensor, k: Tensor) -> Tensor:
        """The layer mask materialised: bool (B, H, Lq, Lk) for the dense-only normalisers."""
        return to_dense(self.layer_mask(), q.shape[0], self.num_heads, q.shape[2], k.shape[2], device=q.device)

    def softmax_attend(self, q: Tensor, k: Tensor, v: Tensor, score_mod: ScoreMod | None = None,
                       mask_mod: MaskMod | None = None) -> Tensor:
        """Masked softmax attention on the layer's path (refuses Flex under autograd: no CPU backward).

        The layer mask (:meth:`layer_mask`) always applies. ``mask_mod`` given: a per-call (data-dependent) mask in
        chunk-local positions, such as DMA's top-w or MODA's groups, ANDed with it; that block mask is built for this
        call only and not stored in ``self.block_masks`` (it would never be reused, and each entry pins a
        (B, H, T, T) table). ``None``: the layer mask alone, cached per length. ``score_mod`` is passed as given
        (wrap layer-level ones with :meth:`at_positions`).

        With a host model's ``attention_hook`` set (``attnlab.lab.modeling``): without a score_mod the softmax is
        the host's (``hook.softmax(q, k, v, keep, scale)``, keep = the mask materialised as bool (B, H, Lq, Lk), or
        None for the plain causal mask), so transformers' attention interface and attnlab's Session see it; with a
        score_mod the layer computes its own output and shows the hook the map it implies
        (:func:`attnlab.functional.implied.softmax_map`).
        """
        if self.path == "flex" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise NotImplementedError("path='flex' is inference-only here (FlexAttention has no CPU backward); "
                                      "use path='dense' for training or run under torch.no_grad()")
        per_call = mask_mod is not None
        mask = self.call_mask(mask_mod)
        if self.attention_hook is not None:
            keep = self._hook_keep(mask, q, k)
            if score_mod is None:
                return self.attention_hook.softmax(q, k, v, keep, q.shape[-1] ** -0.5)
            if self.wants_map:
                self._expose_softmax_map(q, k, v, mask if keep is None else keep, score_mod)
        return masked_attention(q, k, v, mask, score_mod=score_mod, path=self.path, compiled=self.compiled,
                                cache=None if per_call else self.block_masks)

    def _hook_keep(self, mask: MaskMod, q: Tensor, k: Tensor) -> Tensor | None:
        """The mask as bool (B, H, Lq, Lk) for the host hook, or None when it is the plain causal mask."""
        if mask is self.mask_mod and getattr(mask, "__name__", None) == "causal":
            return None
        return to_dense(mask, q.shape[0], self.num_heads, q.shape[2], k.shape[2], device=q.device)

    def _expose_softmax_map(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | MaskMod,
                            score_mod: ScoreMod) -> None:
        """Show the hook the softmax map of a score_mod call (keys/values repeated per query head, detached)."""
        if not isinstance(keep, Tensor):  # the plain causal mask
            keep = to_dense(keep, 1, 1, q.shape[2], k.shape[2], device=q.device)
        groups = self.num_heads // k.shape[1]
        with torch.no_grad():
            self.expose_map(softmax_map(q.detach(), k.detach().repeat_interleave(groups, dim=1),
                                        v.detach().repeat_interleave(groups, dim=1), keep,
                                        scale=q.shape[-1] ** -0.5, score_mod=score_mod))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, extra: Tensor, hidden_states: Tensor) -> Tensor:
        """(B, H, T, D) heads out. Default: masked softmax attention."""
        return self.softmax_attend(q, k, v)

    def forward(self, hidden_states: Tensor, *, state: None = None, position_offset: int = 0) -> tuple[Tensor, None]:
        """hidden_states: (B, T, C) at positions position_offset … (no KV cache: ``state`` must be None).
        Returns (output (B, T, C), None)."""
        q, k, v, extra = self.project(hidden_states, self.start_position(state, position_offset))
        o = self.attend(q, k, v, extra, hidden_states)  # (B, H, T, D)
        return self.o_proj(merge_heads(o.to(hidden_states.dtype))), None
