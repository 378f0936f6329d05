"""Titans neural long-term memory: an MLP whose weights are the state, written by gradient steps with momentum
and forgetting (Behrouz et al. 2025, §3 (METHODS.md #31)).

Per head, memory ``M_W(x) = silu(x W1) W2`` with W1 (D, E), W2 (E, D). For token t of chunk n (chunk start
weights W^(n)):

    u_t = ∇_W ‖M_{W^(n)}(k_t) - v_t‖²              (gradient at the chunk-start weights: mini-batch GD)
    S_t = η_t S_{t-1} - θ_t u_t                     (surprise with momentum; η past-surprise decay, θ step size)
    W_t = (1 - α_t) W_{t-1} + S_t                   (forgetting / weight decay)
    y_t = M_{W^(n)}(q_t)                            (retrieval reads the memory as it was at the chunk start)

With chunk_size = 1 this is the fully online rule (token t reads M_{t-1}, then writes). A last chunk shorter than
chunk_size (including a whole sequence shorter than one chunk) still writes the memory: public code that only
stores full chunks silently drops those tokens.

Forms: ``chunk`` (per chunk: closed-form per-token gradients as matmuls, the momentum/forgetting recurrences
solved with a (c, c) matrix of decay products, every exponent ≤ 0) and ``recurrent`` (token by token, explicit
per-token gradients). There is no quadratic ``parallel`` form: the memory is nonlinear in its weights, so a
chunk's writes depend on the previous chunk's weights. The loop oracle with autograd gradients is
``functional/reference/titans.py``.

Shape legend: B batch, H num_heads, T seq_len, D head_dim, E memory hidden width.
State: ``(W1 (B, H, D, E), W2 (B, H, E, D), S1 (B, H, D, E), S2 (B, H, E, D))``, weights then momenta.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.attention import compute_dtype

__all__ = ["MEMORY_FORMS", "context_attention", "context_keep", "memory_read", "neural_memory", "window_attention",
           "window_keep"]

MEMORY_FORMS = ("chunk", "recurrent")


def memory_read(x: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """M_W(x) = silu(x W1) W2: x (B, H, n, D), W1 (B, H, D, E), W2 (B, H, E, D) -> (B, H, n, D)."""
    return F.silu(x @ w1) @ w2


def _loss_grads(k: Tensor, v: Tensor, w1: Tensor, w2: Tensor):
    """Pieces of ∇‖M(k) - v‖² per token: returns (k, dh, a, dy) with dW1_t = k_tᵀ dh_t and dW2_t = a_tᵀ dy_t."""
    h = k @ w1  # (B, H, n, E)
    a = F.silu(h)
    dy = 2 * (a @ w2 - v)  # (B, H, n, D)
    sig = torch.sigmoid(h)
    dh = (dy @ w2.transpose(-1, -2)) * sig * (1 + h * (1 - sig))  # silu'(h) = σ(h)(1 + h(1 - σ(h)))
    return k, dh, a, dy


# Floor of a gate's log in the chunk form: a saturated gate (η = 0, or α = 1 as σ(20) is in float32) has
# log -inf, and -inf - (-inf) = NaN in the cumulative-log differences. The gate is raised to exp(LOG_FLOOR),
# below the rounding of its dtype (exp(-30) ≈ 1e-13 < float32 eps, exp(-80) ≈ 2e-35 < float64 eps), so the
# product equals the true 0 to working precision; the other exponents of that chunk keep an absolute rounding
# of about (#saturated · |floor|) ulp.
LOG_FLOOR = {torch.float32: -30.0, torch.float64: -80.0}


def _log_gate(p: Tensor) -> Tensor:
    """log max(p, exp(LOG_FLOOR)); zero gradient where p is below the floor (a straight-through gradient would
    be multiplied by 1/floor and lose everything to cancellation in the cumulative-log differences)."""
    floor = LOG_FLOOR[p.dtype]
    above = p > torch.exp(torch.tensor(floor, dtype=p.dtype))
    return torch.where(above, torch.where(above, p, torch.ones_like(p)).log(), torch.full_like(p, floor))


def _log_keep(alpha: Tensor) -> Tensor:
    """log(1 - α): log1p for α < 1/2 (accurate near 0), else log of 1 - α (exact there), floored as _log_gate."""
    small = alpha < 0.5
    return torch.where(small, torch.log1p(-torch.where(small, alpha, torch.zeros_like(alpha))), _log_gate(1 - alpha))


def _check(query, key, value, lr, momentum, forget, state, chunk_size, form):
    if form not in MEMORY_FORMS:
        raise ConfigError(f"expected form in {list(MEMORY_FORMS)} (no parallel form for a nonlinear memory), "
                          f"got {form!r}")
    if chunk_size < 1:
        raise ConfigError(f"expected chunk_size >= 1, got {chunk_size}")
    if query.dim() != 4 or key.shape != query.shape or value.shape != query.shape:
        raise ShapeError(f"expected query/key/value (batch, heads, seq_len, dim) of one shape, got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    for name, gate in (("lr", lr), ("momentum", momentum), ("forget", forget)):
        if gate.shape != query.shape[:3]:
            raise ShapeError(f"expected {name} of shape {tuple(query.shape[:3])}, got {tuple(gate.shape)}")
    B, H, _, D = query.shape
    if len(state) != 4 or state[0].shape[:3] != (B, H, D) or state[1].shape[:2] != (B, H) or \
            state[1].shape[3] != D or state[2].shape != state[0].shape or state[3].shape != state[1].shape:
        raise ShapeError(f"expected state (W1 ({B}, {H}, {D}, E), W2 ({B}, {H}, E, {D}), S1, S2 alike), got "
                         f"{[tuple(s.shape) for s in state]}")


def neural_memory(query: Tensor, key: Tensor, value: Tensor, lr: Tensor, momentum: Tensor, forget: Tensor,
                  initial_state: tuple[Tensor, Tensor, Tensor, Tensor], *, chunk_size: int = 16,
                  form: str = "chunk") -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Read and write a Titans neural memory over a sequence.

    Args:
        query, key, value: (B, H, T, D); any float dtype, computed in float32 (float64 stays float64).
        lr: θ (B, H, T) ≥ 0. momentum: η (B, H, T) in [0, 1]. forget: α (B, H, T) in [0, 1]. Saturated gates
            (η = 0, α = 1) are exact in both forms, but the chunk form's gradient w.r.t. a gate that is exactly
            saturated is 0 (its log is floored at ``LOG_FLOOR``); use form="recurrent" if that gradient matters.
        initial_state: (W1, W2, S1, S2) as in the module docstring (the weights must not all be zero).
        chunk_size: tokens per chunk (gradients at the chunk-start weights). form: "chunk" or "recurrent".

    Returns:
        output (B, H, T, D) in value's dtype; final state (W1, W2, S1, S2) in float32/float64.

    Raises ConfigError for an unknown form or chunk_size < 1; ShapeError for inconsistent shapes.
    """
    _check(query, key, value, lr, momentum, forget, initial_state, chunk_size, form)
    dtype = compute_dtype(query)
    q, k, v, theta, eta, alpha = (x.to(dtype) for x in (query, key, value, lr, momentum, forget))
    w1, w2, s1, s2 = (s.to(dtype) for s in initial_state)
    T = q.shape[2]
    outputs = []
    if form == "recurrent":
        for start in range(0, T, chunk_size):
            w1_0, w2_0 = w1, w2
            outputs.append(memory_read(q[:, :, start:start + chunk_size], w1_0, w2_0))
            for t in range(start, min(start + chunk_size, T)):
                kt, dh, a, dy = _loss_grads(k[:, :, t:t + 1], v[:, :, t:t + 1], w1_0, w2_0)
                step = theta[:, :, t, None, None]
                s1 = eta[:, :, t, None, None] * s1 - step * (kt.transpose(-1, -2) @ dh)
                s2 = eta[:, :, t, None, None] * s2 - step * (a.transpose(-1, -2) @ dy)
                keep = 1 - alpha[:, :, t, None, None]
                w1, w2 = keep * w1 + s1, keep * w2 + s2
    else:
        log_eta, log_keep = _log_gate(eta), _log_keep(alpha)  # (B, H, T), ≤ 0, finite
        for start in range(0, T, chunk_size):
            sl = slice(start, min(start + chunk_size, T))
            c = sl.stop - start
            outputs.append(memory_read(q[:, :, sl], w1, w2))
            le, lk = log_eta[:, :, sl].cumsum(-1), log_keep[:, :, sl].cumsum(-1)  # (B, H, c) cumulative logs
            lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # [i, j]: i ≥ j
            # M[i, j] = Π_{r=i+1..c} (1-α_r) · Π_{r=j+1..i} η_r: token j's write reaching W_c through S_i
            exponent = (lk[..., -1:, None] - lk[..., :, None]) + (le[..., :, None] - le[..., None, :])
            M = torch.where(lower, exponent, float("-inf")).exp()  # (B, H, c, c)
            write = theta[:, :, sl] * M.sum(-2)  # (B, H, c): Σ_{i≥j} M[i, j] θ_j
            momentum_left = theta[:, :, sl] * (le[..., -1:] - le).exp()  # token j's share of S_c
            from_s0 = (lk[..., -1:] - lk + le).exp().sum(-1)  # Σ_i Π(1-α) after i · Π η up to i
            kt, dh, a, dy = _loss_grads(k[:, :, sl], v[:, :, sl], w1, w2)
            keep_all, eta_all = lk[..., -1].exp()[..., None, None], le[..., -1].exp()[..., None, None]
            w1 = keep_all * w1 + from_s0[..., None, None] * s1 - kt.transpose(-1, -2) @ (write[..., None] * dh)
            w2 = keep_all * w2 + from_s0[..., None, None] * s2 - a.transpose(-1, -2) @ (write[..., None] * dy)
            s1 = eta_all * s1 - kt.transpose(-1, -2) @ (momentum_left[..., None] * dh)
            s2 = eta_all * s2 - a.transpose(-1, -2) @ (momentum_left[..., None] * dy)
    output = torch.cat(outputs, dim=2) if outputs else q.new_zeros(q.shape)
    return output.to(value.dtype), (w1, w2, s1, s2)


def window_attention(query: Tensor, key: Tensor, value: Tensor, persistent_key: Tensor, persistent_value: Tensor,
                     window: int) -> Tensor:
    """Titans MAG's attention branch: causal sliding-window softmax attention plus persistent tokens.

    query (B, H, T, D) holds the segment's last T positions; key/value (B, H, L, D), L ≥ T: the L − T cached
    positions before the segment, then the segment's own. Query i (key index L − T + i) sees key j iff
    ``L − T + i − window < j ≤ L − T + i`` (``window`` keys, itself included), and every persistent token
    (B, H, P, D). Scale D^-1/2 (SDPA). Returns (B, H, T, D) in query's dtype.
    """
    keep = window_keep(query.shape[2], key.shape[2], persistent_key.shape[2], window, query.device)
    return F.scaled_dot_product_attention(query, torch.cat([persistent_key, key], 2),
                                          torch.cat([persistent_value, value], 2), attn_mask=keep)


def context_attention(query: Tensor, key: Tensor, value: Tensor, num_persistent: int) -> Tensor:
    """Titans MAC's segment attention over ``[persistent ∥ retrieved ∥ segment]``.

    query (B, H, T, D) from the segment; key/value (B, H, P + 2T, D): P persistent tokens (visible to every query),
    T retrieved memory tokens h and the T segment tokens x. Query i sees h_j and x_j for j ≤ i (h_j is read with
    x_j's query, so it is causal too). Scale D^-1/2 (SDPA). Returns (B, H, T, D).
    """
    T = query.shape[2]
    keep = context_keep(T, num_persistent, T, query.device)  # (T, P + 2T)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=keep)


def window_keep(q_len: int, kv_len: int, num_persistent: int, window: int, device=None) -> Tensor:
    """MAG's mask (q_len, P + kv_len), True = attend: every persistent key, then key j for query i iff
    ``Lk − Lq + i − window < j ≤ Lk − Lq + i`` (the queries are the last q_len of the kv_len positions)."""
    q_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=device)[None, :]
    keep = (k_pos <= q_pos) & (k_pos > q_pos - window)  # (Lq, Lk)
    return torch.cat([keep.new_ones(q_len, num_persistent), keep], dim=1)


def context_keep(seq_len: int, num_persistent: int, segment_size: int, device=None) -> Tensor:
    """MAC's mask (T, P + 2T) over keys ``[persistent ∥ retrieved h ∥ tokens x]``, True = attend: every persistent
    key, and h_j, x_j for j ≤ i in query i's segment (segments of ``segment_size`` tokens; one segment: causal)."""
    pos = torch.arange(seq_len, device=device)
    same = (pos[:, None] // segment_size) == (pos[None, :] // segment_size)
    local = same & (pos[None, :] <= pos[:, None])  # (T, T)
    return torch.cat([local.new_ones(seq_len, num_persistent), local, local], dim=1)
