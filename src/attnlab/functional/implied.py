"""The attention map a layer's call implies, for layers that are not plain softmax attention.

Every probe reads attention as blocks of query rows (``attnlab.functional.attention.BlockView``). Softmax layers
produce them directly; the other layers expose an :class:`ImpliedMap` (``Layer.expose_map``) that computes the
weights ``w[b, h, i, j]`` of query i on key j block by block, from the tensors the layer already computed, and turns
them into probabilities per its ``kind``:

    softmax     probs = softmax(logits) over the visible keys (the logits are known: score_mod layers, Titans).
    normalised  the layer itself divides w ≥ 0 by its row sum (Hedgehog, normalised sigmoid / elu+1):
                probs = w / Σ_j w.
    proxy       w ≥ 0 and the layer does *not* normalise (sigmoid, ReLU, elu+1 unnormalised, CACE):
                probs = w / Σ_j w, the proxy Gu et al. 2025 measure sinks on (METHODS.md #1, #34(a)).
    signed      w may be negative (linear attention without a positive feature map: GLA, retention, lightning,
                LightNet): probs = |w| / Σ_j |w|, each key's share of the row's absolute weight.

A row whose visible weights are all 0 (or that sees no key) gets probs 0, and its ``keep`` is False in the block,
so observers skip it as they skip a row with no visible key. ``BlockView.logits`` are the true logits for
``softmax`` and ``log |w|`` otherwise, ``torch.finfo(dtype).min`` where the weight is 0 or masked, so that
``softmax(logits) == probs`` on every row that has a visible nonzero weight.

Shape legend: B batch, H num_heads (query heads; key/value GQA-expanded, query head h reads kv head
``h // (H // Hkv)``), Lq q_len, Lk kv_len, T seq_len (= Lq = Lk for the recurrent layers), D / K head (key) dim,
F feature dim, Dv value dim. ``keep``: bool broadcastable to (B, H, Lq, Lk), True = attend.

Numerical policy: weights in float32 (float64 stays float64, so the loop oracles in
``functional/reference/implied.py`` serve as goldens). Memory per block: O(B · H · block · Lk), and
O(B · H · block · Lk · K) for a per-key-dim decay (GLA, LightNet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.attention import BlockView, causal_keep, check_qkv, compute_dtype

__all__ = ["ImpliedMap", "MapKind", "decayed_softmax_map", "elu_map", "kernel_map", "lightnet_map", "linear_map",
           "relu_map", "sigmoid_map", "softmax_map"]

MapKind = Literal["softmax", "normalised", "proxy", "signed"]
KINDS = ("softmax", "normalised", "proxy", "signed")
# (q_index (n,) long) -> (weights (B, H, n, Lk), logits (B, H, n, Lk) or None): weights 0 where not kept.
RowsFn = Callable[[Tensor], "tuple[Tensor, Tensor | None]"]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class ImpliedMap:
    """The attention map a layer's call implies: weights w[b, h, i, j] of query i on key j (module docstring).

    Attributes:
        kind: how w becomes probabilities (module docstring).
        num_heads, q_len, kv_len, batch: H, Lq, Lk, B.
        value: (B, H, Lk, Dv), what the weights multiply (GQA expanded).
        keep: bool broadcastable to (B, H, Lq, Lk), the keys the layer lets each query see, or None (all).
        causal: whether the layer is causal (query i sees keys j ≤ i + Lk − Lq).
        rows: computes (weights, logits) for a set of query rows; built by the constructors of this module.
    """

    kind: MapKind
    num_heads: int
    q_len: int
    kv_len: int
    batch: int
    value: Tensor
    keep: Tensor | None
    causal: bool
    rows: RowsFn = field(repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"expected kind in {KINDS}, got {self.kind!r}")

    def weights(self, q_index: Tensor) -> Tensor:
        """(B, H, n, Lk) float32/64: w for the query rows ``q_index`` (n,) long, 0 where not kept. For ``softmax``
        the weights are the softmax probabilities."""
        return self.rows(q_index)[0]

    def dense(self) -> Tensor:
        """(B, H, Lq, Lk) weights of every query row: the oracle-facing full map (memory O(Lq · Lk))."""
        return self.weights(torch.arange(self.q_len, device=self.value.device))

    def probs(self, weights: Tensor) -> Tensor:
        """Probabilities from weights per ``kind``: rows sum to 1, or are all 0 when their total is 0."""
        if self.kind == "softmax":
            return weights
        w = weights.abs() if self.kind == "signed" else weights
        total = w.sum(dim=-1, keepdim=True)
        zero = total == 0  # NaN totals stay NaN: observers find them in BlockView.nan_rows
        return torch.where(zero, 0.0, w / torch.where(zero, torch.ones_like(total), total))

    def blocks(self, block_size: int, rows: Tensor | None = None) -> Iterator[BlockView]:
        """``BlockView``s of ``block_size`` query rows each (``rows``: (n,) long, default every row), full key width.

        Raises ValueError if block_size < 1.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        rows = torch.arange(self.q_len, device=self.value.device) if rows is None else rows
        for start in range(0, rows.numel(), block_size):
            index = rows[start:start + block_size]
            weights, logits = self.rows(index)
            probs = self.probs(weights)
            tiny = torch.finfo(probs.dtype).min
            keep = _rows_of(self.keep, index)
            if self.kind == "softmax":
                logits = logits if keep is None else logits.masked_fill(~keep, tiny)
            else:
                w = weights.abs()
                logits = torch.where(w > 0, w.clamp_min(torch.finfo(w.dtype).tiny).log(), tiny)
                logits = torch.where(w.isnan(), w, logits)  # a NaN weight stays visible as a NaN row
            empty = probs.sum(dim=-1, keepdim=True) == 0  # rows with no visible nonzero weight: skipped
            if bool(empty.any()):
                keep = ~empty if keep is None else keep & ~empty
            if keep is not None:
                keep = keep.expand(probs.shape)
            yield BlockView(probs=probs, logits=logits, keep=keep, q_index=index)


# ----------------------------------------------------------------------------------------------- shared pieces


def _per_query_head(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    """Check shapes; return key and value repeated to the query heads, in the compute dtype."""
    _, groups = check_qkv(query, key, value)
    dtype = compute_dtype(query)
    return key.repeat_interleave(groups, dim=1).to(dtype), value.repeat_interleave(groups, dim=1).to(dtype), dtype


def _check_keep(keep: Tensor | None, shape: tuple[int, int, int, int]) -> Tensor | None:
    if keep is None:
        return None
    if keep.dtype != torch.bool or keep.dim() > 4 or any(
            k not in (1, s) for k, s in zip(keep.shape[::-1], shape[::-1])):
        raise ShapeError(f"expected keep bool broadcastable to {shape}, got {keep.dtype} {tuple(keep.shape)}")
    return keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))


def _rows_of(keep: Tensor | None, index: Tensor) -> Tensor | None:
    if keep is None:
        return None
    return keep if keep.shape[-2] == 1 else keep[..., index, :]


def _is_causal(keep: Tensor | None, q_len: int, kv_len: int) -> bool:
    """True if keep never lets query i see a key after position i + Lk − Lq."""
    if keep is None:
        return False
    future = ~causal_keep(q_len, kv_len, keep.device)
    return not bool((keep & future).any())


def _build(kind: MapKind, query: Tensor, value: Tensor, keep: Tensor | None, causal: bool, rows: RowsFn,
           kv_len: int) -> ImpliedMap:
    return ImpliedMap(kind=kind, num_heads=query.shape[1], q_len=query.shape[2], kv_len=kv_len,
                      batch=query.shape[0], value=value, keep=keep, causal=causal, rows=rows)


# ----------------------------------------------------------------------------------------- softmax-like maps


def softmax_map(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None, *,
                scale: float | None = None, score_mod: ScoreMod | None = None) -> ImpliedMap:
    """Softmax attention's map: probs = softmax(scale · q·k (+ score_mod)) over the keys ``keep`` allows.

    Args:
        query: (B, H, Lq, D). key: (B, Hkv, Lk, D). value: (B, Hkv, Lk, Dv). keep: bool or None (all visible).
        scale: default D^-1/2. score_mod: FlexAttention form ``(logits, b, h, q_idx, kv_idx) -> logits`` with q_idx
            the query row (0 … Lq − 1; shift it beforehand for a chunk at an offset).

    Returns an ImpliedMap of kind "softmax". Raises ShapeError on inconsistent shapes.
    """
    k, v, dtype = _per_query_head(query, key, value)
    B, H, Lq, D = query.shape
    Lk = k.shape[2]
    keep = _check_keep(keep, (B, H, Lq, Lk))
    scale = D ** -0.5 if scale is None else scale

    def rows(index: Tensor) -> tuple[Tensor, Tensor]:
        logits = (query[:, :, index].to(dtype) @ k.transpose(-1, -2)) * scale  # (B, H, n, Lk)
        if score_mod is not None:
            b = torch.arange(B, device=query.device)[:, None, None, None]
            h = torch.arange(H, device=query.device)[None, :, None, None]
            kv = torch.arange(Lk, device=query.device)[None, None, None, :]
            logits = score_mod(logits, b, h, index[None, None, :, None], kv).expand_as(logits)
        blk = _rows_of(keep, index)
        masked = logits if blk is None else logits.masked_fill(~blk, float("-inf"))
        has_key = ~torch.isneginf(masked).all(dim=-1, keepdim=True)
        probs = torch.softmax(torch.where(has_key, masked, 0.0), dim=-1) * has_key
        return probs, logits

    return _build("softmax", query, v, keep, _is_causal(keep, Lq, Lk), rows, Lk)


def decayed_softmax_map(query: Tensor, key: Tensor, value: Tensor, decay: Tensor, keep: Tensor | None = None, *,
                        scale: float | None = None) -> ImpliedMap:
    """CACE's map: w = softmax(scale · q·k) ⊙ decay, not renormalised (METHODS.md #33); kind "proxy".

    decay: broadcastable to (B, H, Lq, Lk), values in (0, 1]. Other arguments as :func:`softmax_map`.
    """
    inner = softmax_map(query, key, value, keep, scale=scale)
    d = decay.reshape((1,) * (4 - decay.dim()) + tuple(decay.shape))

    def rows(index: Tensor) -> tuple[Tensor, None]:
        probs = inner.rows(index)[0]
        return probs * (d if d.shape[-2] == 1 else d[..., index, :]).to(probs.dtype), None

    return _build("proxy", query, inner.value, inner.keep, inner.causal, rows, inner.kv_len)


def _pointwise_map(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None, scale: float | None,
                   fn: Callable[[Tensor, Tensor | None], Tensor], kind: MapKind) -> ImpliedMap:
    k, v, dtype = _per_query_head(query, key, value)
    B, H, Lq, D = query.shape
    keep = _check_keep(keep, (B, H, Lq, k.shape[2]))
    scale = D ** -0.5 if scale is None else scale

    def rows(index: Tensor) -> tuple[Tensor, None]:
        logits = (query[:, :, index].to(dtype) @ k.transpose(-1, -2)) * scale
        blk = _rows_of(keep, index)
        w = fn(logits, blk)
        return (w if blk is None else w * blk), None

    return _build(kind, query, v, keep, _is_causal(keep, Lq, k.shape[2]), rows, k.shape[2])


def sigmoid_map(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None, *, scale: float | None = None,
                bias: float = 0.0, normalised: bool = False) -> ImpliedMap:
    """Sigmoid attention's map: w = σ(scale · q·k + bias) on kept keys (METHODS.md #34(a), (b)).

    ``normalised=False``: kind "proxy" (the layer uses w as is); True: "normalised" (the layer divides by Σ w).
    Arguments as :func:`softmax_map`; ``bias`` is the layer's resolved bias (e.g. −log Lk).
    """
    return _pointwise_map(query, key, value, keep, scale, lambda logits, _: torch.sigmoid(logits + bias),
                          "normalised" if normalised else "proxy")


def relu_map(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None, *, scale: float | None = None,
             normalised: bool = False) -> ImpliedMap:
    """ReLU attention's map: w = ReLU(scale · q·k) / (number of kept keys of the row) (METHODS.md #3, #34(c)).

    Kind "proxy" (or "normalised" when the layer divides by Σ w). Arguments as :func:`softmax_map`.
    """
    def fn(logits: Tensor, blk: Tensor | None) -> Tensor:
        count = logits.shape[-1] if blk is None else blk.sum(dim=-1, keepdim=True).clamp_min(1).to(logits.dtype)
        return torch.relu(logits) / count

    return _pointwise_map(query, key, value, keep, scale, fn, "normalised" if normalised else "proxy")


def kernel_map(query_features: Tensor, key_features: Tensor, value: Tensor, keep: Tensor | None = None, *,
               normalised: bool, scale: float = 1.0) -> ImpliedMap:
    """Kernel (feature-map) attention's map: w = scale · φ(q_i)·φ(k_j) on kept keys, φ ≥ 0 given as features.

    Args:
        query_features: (B, H, Lq, F) = φ(query). key_features: (B, Hkv, Lk, F). value: (B, Hkv, Lk, Dv).
        keep: bool or None. normalised: whether the layer divides by Σ_j w (kind "normalised", else "proxy").
    """
    return _pointwise_map(query_features, key_features, value, keep, scale, lambda logits, _: logits,
                          "normalised" if normalised else "proxy")


def elu_map(query: Tensor, key: Tensor, value: Tensor, keep: Tensor | None = None, *, normalised: bool = True,
            scale: float = 1.0) -> ImpliedMap:
    """elu+1 kernel attention's map: w = scale · φ(q)·φ(k), φ(x) = elu(x) + 1 > 0 (Gu et al. 2025, METHODS.md #34(a))."""
    return kernel_map(F.elu(query) + 1, F.elu(key) + 1, value, keep, normalised=normalised, scale=scale)


# ----------------------------------------------------------------------------------------- decayed linear maps


def _log_decay_per_key(log_decay: Tensor | None, B: int, H: int, T: int, dtype: torch.dtype) -> Tensor | None:
    """log_decay as (B|1, H, T, 1|K) in dtype, or None."""
    if log_decay is None:
        return None
    if log_decay.shape == (H,):
        return log_decay.to(dtype)[None, :, None, None].expand(1, H, T, 1)
    if log_decay.dim() == 3 and log_decay.shape == (B, H, T):
        return log_decay.to(dtype)[..., None]
    if log_decay.dim() == 4 and log_decay.shape[:3] == (B, H, T):
        return log_decay.to(dtype)
    raise ShapeError(f"expected log_decay None, ({H},), ({B}, {H}, {T}) or ({B}, {H}, {T}, key_dim), "
                     f"got {tuple(log_decay.shape)}")


def linear_map(query: Tensor, key: Tensor, value: Tensor, log_decay: Tensor | None = None, *,
               scale: float | None = None, kind: MapKind = "signed") -> ImpliedMap:
    """Decaying linear attention's map: ``w_ij = scale Σ_d q_id k_jd exp(G_id − G_jd)`` for j ≤ i, else 0.

    G is the cumulative sum of log_decay over time, so ``exp(G_i − G_j) = Π_{r=j+1..i} decay_r``: the weight
    the recurrence ``S_t = Diag(exp(g_t)) S_{t-1} + k_tᵀ v_t, o_t = scale q_t S_t`` gives key j at query i
    (``functional/linear_attention.py``; GLA, retention, lightning: METHODS.md #21, #23, #35). The map covers
    this call's keys only: an initial state's contribution is not in it.

    Args:
        query: (B, H, T, K). key: (B, Hkv, T, K). value: (B, Hkv, T, Dv).
        log_decay: None (no decay), (H,), (B, H, T) or (B, H, T, K), ≤ 0, per query head.
        scale: default K^-1/2. kind: "signed" (default) or another kind when the caller knows w ≥ 0.

    Returns an ImpliedMap (causal). Raises ShapeError on inconsistent shapes or q_len != kv_len.
    """
    k, v, dtype = _per_query_head(query, key, value)
    B, H, T, K = query.shape
    if k.shape[2] != T:
        raise ShapeError(f"linear_map needs q_len == kv_len, got {T} and {k.shape[2]}")
    scale = K ** -0.5 if scale is None else scale
    g = _log_decay_per_key(log_decay, B, H, T, dtype)
    cum = None if g is None else g.to(torch.float64).cumsum(dim=2)  # G (B|1, H, T, 1|K), float64 for the differences
    keep = causal_keep(T, T, query.device)[None, None]

    def rows(index: Tensor) -> tuple[Tensor, None]:
        q = query[:, :, index].to(dtype) * scale  # (B, H, n, K)
        visible = keep[..., index, :]  # (1, 1, n, T)
        if cum is None:
            w = q @ k.transpose(-1, -2)
        elif cum.shape[-1] == 1:  # one decay per head and step
            diff = cum[:, :, index] - cum.transpose(-1, -2)  # (B|1, H, n, T): G_i − G_j
            w = (q @ k.transpose(-1, -2)) * diff.masked_fill(~visible, float("-inf")).exp().to(dtype)
        else:  # per key dim: (B, H, n, T, K) of decays
            diff = (cum[:, :, index, None, :] - cum[:, :, None, :, :]).to(dtype)  # subtract in float64, then cast
            decay = diff.masked_fill_(~visible[..., None], float("-inf")).exp_()
            w = torch.einsum("bhnk,bhnjk,bhjk->bhnj", q, decay, k)
        return w * visible, None

    return _build(kind, query, v, keep, True, rows, T)


def lightnet_map(query: Tensor, key: Tensor, value: Tensor, *, scale: float | None = None,
                 initial_log_normaliser: Tensor | None = None) -> ImpliedMap:
    """LightNet's map: ``w_ij = scale Σ_d q_id exp(k_jd − Z_id)`` for j ≤ i, ``Z_i = logcumsumexp_{s≤i} k_s``.

    The additive recurrence ``o_t = scale q_t (Σ_{s≤t} exp(k_s)ᵀ v_s / Σ_{s≤t} exp(k_s))`` (METHODS.md #24) written
    per key; every exponent is ≤ 0. ``initial_log_normaliser`` (B, H, K): Z of a previous segment, which enters
    the normaliser (the previous segment's keys are not in the map). Kind "signed" (q = SiLU(·) may be < 0).
    Shapes as :func:`linear_map`.
    """
    k, v, dtype = _per_query_head(query, key, value)
    B, H, T, K = query.shape
    if k.shape[2] != T:
        raise ShapeError(f"lightnet_map needs q_len == kv_len, got {T} and {k.shape[2]}")
    scale = K ** -0.5 if scale is None else scale
    Z = torch.logcumsumexp(k, dim=2)  # (B, H, T, K)
    if initial_log_normaliser is not None:
        Z = torch.logaddexp(Z, initial_log_normaliser.to(dtype)[:, :, None])
    keep = causal_keep(T, T, query.device)[None, None]

    def rows(index: Tensor) -> tuple[Tensor, None]:
        visible = keep[..., index, :, None]  # (1, 1, n, T, 1)
        exponent = (k[:, :, None, :, :] - Z[:, :, index, None, :]).masked_fill(~visible, float("-inf"))
        w = torch.einsum("bhnk,bhnjk->bhnj", query[:, :, index].to(dtype) * scale, exponent.exp())
        return w, None

    return _build("signed", query, v, keep, True, rows, T)

