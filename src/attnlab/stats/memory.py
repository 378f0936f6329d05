"""Memory fidelity of a decaying linear recurrence, horizontal (within a layer) and vertical (across layers).

MemMamba (Wang et al. 2025, METHODS.md #15) defines ETMF (expected token memory fidelity) and ECLMF (expected
cross-layer memory fidelity) only in words (low confidence, from the abstract); the estimators here are ours:

- horizontal, for the recurrence S_t = Diag(exp(g_t)) S_(t-1) + k_tᵀ v_t of :mod:`attnlab.functional.linear_attention`:
  token t's value is read back from the state k steps later with its own key, r_t(k) = (k_t / ‖k_t‖²) S_(t+k).
  ``retention(k)`` = E_t ⟨r_t(k), v_t⟩ / ‖v_t‖² (exactly the decay product for orthonormal keys) and
  ``fidelity(k)`` = E_t cos(r_t(k), v_t) (1 when nothing else interferes);
- vertical: E_t cos(x_t^(l), x_t^(l')) between a token's input to two recurrent layers l < l'.

Shape legend: B batch, H heads, T steps, K key dim, V value dim.
"""

from __future__ import annotations

import torch
from torch import Tensor


def horizontal_fidelity(key: Tensor, value: Tensor, log_decay: Tensor | None, lags: list[int],
                        valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Retention and cosine fidelity of each head's state at the given lags.

    Args:
        key: (B, H, T, K), value: (B, H, T, V) (query heads; expand kv heads first).
        log_decay: None, (H,), (B, H, T) or (B, H, T, K), ≤ 0 (see the linear_attention module).
        lags: k values ≥ 0. valid: (B, T) bool real tokens (right padding only), default all.
    Returns:
        retention (H, len(lags)), fidelity (H, len(lags)) means over (batch, t) pairs with t + k real, and the
        number of pairs per lag (len(lags),); float64. Computed step by step in float64.
    """
    B, H, T, K = key.shape
    k, v = key.double(), value.double()
    if log_decay is None:
        g = torch.zeros(B, H, T, K, dtype=torch.float64)
    elif log_decay.dim() == 1:
        g = log_decay.double()[None, :, None, None].expand(B, H, T, K)
    elif log_decay.dim() == 3:
        g = log_decay.double()[..., None].expand(B, H, T, K)
    else:
        g = log_decay.double()
    valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid.bool().cpu()
    states = []
    state = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        state = g[:, :, t, :, None].exp() * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        states.append(state)
    probe_key = k / (k * k).sum(-1, keepdim=True).clamp_min(1e-300)  # (B, H, T, K)
    retention = torch.zeros(H, len(lags), dtype=torch.float64)
    fidelity = torch.zeros(H, len(lags), dtype=torch.float64)
    pairs = torch.zeros(len(lags), dtype=torch.float64)
    for i, lag in enumerate(lags):
        for t in range(T - lag):
            ok = (valid[:, t] & valid[:, t + lag]).double()  # (B,)
            if float(ok.sum()) == 0:
                continue
            readout = (probe_key[:, :, t, None, :] @ states[t + lag])[:, :, 0]  # (B, H, V)
            target = v[:, :, t]
            norm2 = (target * target).sum(-1)
            ratio = torch.where(norm2 > 0, (readout * target).sum(-1) / norm2.clamp_min(1e-300), 0.0)
            cos = torch.nn.functional.cosine_similarity(readout, target, dim=-1, eps=1e-300)
            retention[:, i] += (ratio * ok[:, None]).sum(0)
            fidelity[:, i] += (cos * ok[:, None]).sum(0)
            pairs[i] += ok.sum()
    return retention / pairs.clamp_min(1), fidelity / pairs.clamp_min(1), pairs


def vertical_fidelity(inputs: list[Tensor], valid: Tensor | None = None) -> Tensor:
    """(n, n) mean cosine over real tokens between the inputs (B, T, C) of n recurrent layers (NaN on the diagonal's
    lower triangle is not used: the matrix is symmetric with ones on the diagonal)."""
    n = len(inputs)
    out = torch.ones(n, n, dtype=torch.float64)
    B, T, _ = inputs[0].shape
    valid = torch.ones(B, T, dtype=torch.bool) if valid is None else valid.bool()
    for i in range(n):
        for j in range(i + 1, n):
            cos = torch.nn.functional.cosine_similarity(inputs[i].double(), inputs[j].double(), dim=-1)
            out[i, j] = out[j, i] = cos[valid].mean()
    return out
