"""RoPE's analytic long-term decay bound and the energy-decay fit of attention on a token grid.

Shape legend: D number of distances; C grid cells (temporal × vertical × horizontal offsets).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rope_decay_bound(max_distance: int, head_dim: int, theta: float) -> Tensor:
    """The RoFormer bound on relative q·k over distance, normalised to 1 at distance 0.

    Su et al. 2021 (RoFormer §3.4.3, cited by Xing et al. 2024, CCA, METHODS.md #11): with θ_k = theta^(-2k/d),
    S_j(m) = Σ_{k<j} exp(i m θ_k) and d = head_dim, the relative upper bound of the RoPE logit at distance m is
    B(m) = (1/(d/2)) Σ_{j=1}^{d/2} |S_j(m)|. Returns B(m) / B(0) for m = 0 … max_distance, float64, shape (D,).
    B(0) = (d/2 + 1) / 2.
    """
    half = head_dim // 2
    freqs = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / head_dim)  # (half,)
    m = torch.arange(max_distance + 1, dtype=torch.float64)[:, None]  # (D, 1)
    angle = m * freqs[None, :]
    partial_re, partial_im = torch.cos(angle).cumsum(-1), torch.sin(angle).cumsum(-1)  # S_1 … S_half
    bound = torch.sqrt(partial_re**2 + partial_im**2).mean(-1)
    return bound / ((half + 1) / 2)


def fit_energy_decay(relative: Tensor, counts: Tensor, temporal: Tensor, spatial: Tensor) -> dict[str, float]:
    """Least-squares fit of ``log r = c - alpha * dt - beta * ds`` over grid offsets (Li et al. 2025, METHODS.md #10).

    Args:
        relative: (C,) mean relative attention A_qk / A_qq per offset cell.
        counts: (C,) visible (query, key) pairs per cell; cells with 0 pairs or r <= 0 are skipped, and so is
            the zero offset (r = 1 by definition).
        temporal: (C,) temporal distance |Δframe| of each cell. spatial: (C,) spatial distance within a frame.
    Returns:
        energy_alpha (NaN when every used cell has dt = 0), energy_beta, energy_r2 (log-space R², unweighted);
        all NaN with fewer than 3 usable cells.
    """
    nan = float("nan")
    result = {"energy_alpha": nan, "energy_beta": nan, "energy_r2": nan}
    ok = (counts > 0) & (relative > 0) & torch.isfinite(relative) & ((temporal > 0) | (spatial > 0))
    if int(ok.sum()) < 3:
        return result
    y = torch.log(relative[ok].double())
    columns = [torch.ones_like(y)]
    use_t = bool((temporal[ok] > 0).any())
    if use_t:
        columns.append(-temporal[ok].double())
    use_s = bool((spatial[ok] > 0).any())
    if use_s:
        columns.append(-spatial[ok].double())
    X = torch.stack(columns, dim=1)
    solution = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    residual = y - X @ solution
    total = ((y - y.mean()) ** 2).sum()
    index = 1
    if use_t:
        result["energy_alpha"] = float(solution[index])
        index += 1
    if use_s:
        result["energy_beta"] = float(solution[index])
    r2 = 1 - float((residual**2).sum() / total) if total > 0 else 1.0
    result["energy_r2"] = r2 if math.isfinite(r2) else nan
    return result
