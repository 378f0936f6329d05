"""Pieces shared by the layers: argument checks, head split/merge, per-head gated RMSNorm (math: ``functional/``).

Shape legend: B batch, T seq_len, C hidden_size, H num_heads, D a per-head dim.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.lightning import srms_norm
from attnlab.functional.linear_attention import FORMS
from attnlab.functional.positions import rotary  # noqa: F401  (old home; probes/memory_fidelity imports it)
from attnlab.params import Range, coerce

PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
PositiveFloat = Annotated[float, Range(gt=0)]


def check_arg(owner: Any, param: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type ``hint`` by :func:`attnlab.params.coerce` and returned as that type.

    The one argument check of the layers: an int is an int (not a bool, not 2.5; an integral float such as 2.0
    becomes 2), a float is finite, :class:`attnlab.params.Range` bounds hold, ``X | None`` allows None; e.g.
    ``check_arg(self, "num_groups", num_groups, PositiveInt | None)``. ``owner``: the layer (its registered name
    leads the message) or a name.

    Raises ConfigError, one line: ``"{owner}: {param} must be in [1, inf), got 0"``.
    """
    name = owner if isinstance(owner, str) else getattr(type(owner), "name", None) or type(owner).__name__
    return coerce(value, hint, owner=name, param=param)


def check_form(form: str) -> str:
    """Raise ConfigError unless ``form`` is one of parallel/chunk/recurrent."""
    if form not in FORMS:
        raise ConfigError(f"expected form in {sorted(FORMS)}, got {form!r}")
    return form


def check_heads(hidden_size: int, num_heads: int, num_kv_heads: int | None) -> int:
    """Validate head counts; return num_kv_heads (defaults to num_heads)."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ConfigError(f"expected num_kv_heads dividing num_heads, got {num_kv_heads} and {num_heads}")
    return num_kv_heads


def check_hidden(hidden_states: Tensor, hidden_size: int) -> None:
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_size:
        raise ShapeError(f"expected hidden_states (batch, seq_len, {hidden_size}), got {tuple(hidden_states.shape)}")


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    B, T, _ = x.shape
    return x.view(B, T, num_heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)


class GatedHeadNorm(nn.Module):
    """Per-head RMSNorm with a learnable gain, then ``⊙ swish(gate)`` (fla's fused norm+gate; METHODS.md #21, #35).

    ``elementwise_affine=False`` gives SRMSNorm, ``x / (‖x‖₂/√d)`` (TransNormerLLM, METHODS.md #22).
    """

    def __init__(self, head_dim: int, eps: float = 1e-5, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim)) if elementwise_affine else None

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        """x: (B, H, T, D); gate: (B, H, T, D) or None (no gate); returns x's shape and dtype."""
        out = srms_norm(x, self.eps)
        if self.weight is not None:
            out = out * self.weight
        return out if gate is None else out * F.silu(gate)
