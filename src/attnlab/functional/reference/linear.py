"""Loop oracle for decaying linear attention (``functional/linear_attention.py``), straight from the definition.

    o_t = scale · Σ_k Σ_{s ≤ t} q_tk k_sk (Π_{r=s+1..t} exp(g_rk)) v_s + scale · q_t (Π_{r=0..t} exp(g_r)) S_0

The decay products are multiplied out step by step (no cumulative sums, no chunks, no state recurrence), so the
oracle shares no algebra with the fast forms. Runs in the dtype it is given (use float64 as the golden). Shapes as
in ``functional/linear_attention.py``: query (B, H, T, K), key (B, Hkv, T, K), value (B, Hkv, T, V), log_decay
None | (H,) | (B, H, T) | (B, H, T, K), state (B, H, K, V).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _full_decay(log_decay: Tensor | None, B: int, H: int, T: int, K: int, like: Tensor) -> Tensor:
    """Decay factors exp(log_decay) as a (B, H, T, K) tensor."""
    if log_decay is None:
        return torch.ones(B, H, T, K, dtype=like.dtype)
    g = log_decay.to(like.dtype)
    if g.dim() == 1:
        g = g[None, :, None, None]
    elif g.dim() == 3:
        g = g[..., None]
    return g.exp().expand(B, H, T, K)


def linear_attention_reference(query: Tensor, key: Tensor, value: Tensor, log_decay: Tensor | None = None, *,
                               scale: float | None = None, initial_state: Tensor | None = None):
    """Return ``(output (B, H, T, V), final_state (B, H, K, V))`` in query's dtype, by plain loops over t and s."""
    B, H, T, K = query.shape
    group = H // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scale = K ** -0.5 if scale is None else scale
    dtype = query.dtype
    alpha = _full_decay(log_decay, B, H, T, K, query)
    state0 = torch.zeros(B, H, K, value.shape[-1], dtype=dtype) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(T):
        out = torch.zeros(B, H, value.shape[-1], dtype=dtype)
        product = torch.ones(B, H, K, dtype=dtype)  # Π_{r=s+1..t} alpha_r
        for s in range(t, -1, -1):
            weight = (query[:, :, t] * key[:, :, s].to(dtype) * product).sum(-1)  # (B, H)
            out = out + weight[..., None] * value[:, :, s].to(dtype)
            product = product * alpha[:, :, s]
        out = out + ((query[:, :, t] * product)[..., None] * state0).sum(-2)  # product = Π_{r=0..t}
        outputs.append(out * scale)
    state = state0
    for s in range(T):  # final state: Σ_s (Π_{r=s+1..T-1} alpha_r) k_sᵀ v_s + Π_r alpha_r S_0
        product = torch.ones(B, H, K, dtype=dtype)
        for r in range(s + 1, T):
            product = product * alpha[:, :, r]
        state = state + (product * key[:, :, s].to(dtype))[..., None] * value[:, :, s, None, :].to(dtype)
    total = torch.ones(B, H, K, dtype=dtype)
    for r in range(T):
        total = total * alpha[:, :, r]
    state = state - state0 + total[..., None] * state0
    output = torch.stack(outputs, dim=2) if T else torch.zeros(B, H, 0, value.shape[-1], dtype=dtype)
    return output, state


def lightnet_reference(query: Tensor, key: Tensor, value: Tensor, *, scale: float | None = None,
                       initial_state: tuple[Tensor, Tensor] | None = None):
    """LightNet's additive form by plain sums: ``o_t = scale · q_t (Σ_{s≤t} exp(k_s)ᵀ v_s / Σ_{s≤t} exp(k_s))``.

    ``initial_state = (state, log_normaliser)`` stands for a past with ``Σ exp(k) = exp(log_normaliser)`` and
    ``Σ exp(k)ᵀ v = exp(log_normaliser) ⊙ state``. Returns ``(output, (state, log_normaliser))``.
    """
    B, H, T, K = query.shape
    group = H // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1).to(query.dtype), value.repeat_interleave(group, dim=1)
    scale = K ** -0.5 if scale is None else scale
    numer = torch.zeros(B, H, K, value.shape[-1], dtype=query.dtype)
    denom = torch.zeros(B, H, K, dtype=query.dtype)
    if initial_state is not None:
        denom = initial_state[1].to(query.dtype).exp()
        numer = denom[..., None] * initial_state[0].to(query.dtype)
    outputs = []
    for t in range(T):
        weight = key[:, :, t].exp()  # (B, H, K)
        numer = numer + weight[..., None] * value[:, :, t, None, :].to(query.dtype)
        denom = denom + weight
        outputs.append(scale * (query[:, :, t, :, None] * numer / denom[..., None]).sum(-2))
    return torch.stack(outputs, dim=2), (numer / denom[..., None], denom.log())
