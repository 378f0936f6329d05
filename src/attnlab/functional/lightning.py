"""Lightning Attention / TransNormerLLM pieces: decay schedules, LRPE-d, SRMSNorm (METHODS.md #22, #23).

Lightning Attention itself is the chunk form of ``functional/linear_attention.py`` with a constant per-head decay:
exact masked attention inside each block, the state carried between blocks (Qin et al. 2024, §3 (METHODS.md #23)).

Shape legend: B batch, H num_heads, T seq_len, D head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.functional.attention import compute_dtype
from attnlab.functional.linear_attention import linear_attention
from attnlab.functional.positions import alibi_slopes

__all__ = ["lightning_attention", "lightning_log_decay", "lrpe", "srms_norm"]


def lightning_log_decay(num_heads: int, layer_idx: int, num_layers: int, schedule: str = "code") -> Tensor:
    """Per-(layer, head) log decay, (H,) float32, ≤ 0.

    ``schedule="code"`` (default, the released implementation): ``-m_h (1 - l/(L-1) + 1e-5)`` with ALiBi slopes
    m_h, so layer 0 decays most and the last layer hardly decays (Qin et al. 2023, §3.1 (METHODS.md #22)).
    ``schedule="paper"``: ``-(8h/H)(1 - l/L)`` with h = 1..H (medium confidence in METHODS.md #22).
    Raises ConfigError for a bad layer index or schedule.
    """
    if not 0 <= layer_idx < num_layers:
        raise ConfigError(f"expected 0 <= layer_idx < num_layers, got {layer_idx} and {num_layers}")
    if schedule == "code":
        depth = 1 - layer_idx / (num_layers - 1) if num_layers > 1 else 1.0
        return (-alibi_slopes(num_heads) * (depth + 1e-5)).float()
    if schedule == "paper":
        h = torch.arange(1, num_heads + 1, dtype=torch.float64)
        return (-(8 * h / num_heads) * (1 - layer_idx / num_layers)).float()
    raise ConfigError(f"expected schedule 'code' or 'paper', got {schedule!r}")


def lrpe(x: Tensor, offset: int = 0, base: float = 10000.0) -> Tensor:
    """LRPE-d feature doubling: (B, H, T, D) -> (B, H, T, 2D) = [x ⊙ cos(nθ), x ⊙ sin(nθ)] at positions n.

    Then ``lrpe(q)·lrpe(k) = Σ_d q_d k_d cos((n - m) θ_d)``, the real part of the relative rotation e^{iθ(n-m)}
    (TransNormerLLM LRPE-d, METHODS.md #22); θ_d = base^(-d/D) fixed (low confidence: the paper's θ may be
    learned). Works under decay, chunking and segments because it only depends on absolute positions.
    """
    D = x.shape[-1]
    theta = base ** (-torch.arange(D, dtype=torch.float64, device=x.device) / D)
    angle = torch.arange(offset, offset + x.shape[2], dtype=torch.float64, device=x.device)[:, None] * theta
    return torch.cat([x * angle.cos().to(x.dtype), x * angle.sin().to(x.dtype)], dim=-1)


def srms_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """SRMSNorm ``x / (‖x‖₂ / √d)`` over the last dim, no gain (TransNormerLLM, METHODS.md #22); in float32
    (float64 stays float64)."""
    return F.rms_norm(x.to(compute_dtype(x)), (x.shape[-1],), None, eps).to(x.dtype)


def lightning_attention(query: Tensor, key: Tensor, value: Tensor, log_decay: Tensor, *, form: str = "chunk",
                        chunk_size: int = 64, initial_state: Tensor | None = None,
                        output_final_state: bool = False) -> tuple[Tensor, Tensor | None]:
    """Causal ``O = ((Q Kᵀ) ⊙ D) V`` with ``D_ts = exp(log_decay_h (t - s))`` for t ≥ s, unscaled (scale 1, as the
    lightning kernels). query (B, H, T, D), key (B, Hkv, T, D), value (B, Hkv, T, Dv), log_decay (H,).
    chunk_size: the block of Lightning Attention-2 (tokens per chunk of the chunk form).
    Returns output (B, H, T, Dv) and final_state (B, H, D, Dv) or None. Raises as ``linear_attention``."""
    return linear_attention(query, key, value, log_decay, form=form, scale=1.0, chunk_size=chunk_size,
                            initial_state=initial_state, output_final_state=output_final_state)
