"""σReparam (Zhai et al. 2023, METHODS.md #4): spectrally normalised linear layers times a learnable scalar."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.functional.masks import MaskMod
from attnlab.layers import LAYERS
from attnlab.layers._softmax_base import SoftmaxFamilyAttention
from attnlab.layers.base import DEFAULT_NUM_HEADS


class SigmaReparamLinear(nn.Module):
    """Linear layer with Ŵ = (γ / σ(W)) · W, σ(W) by one power-iteration step per training forward.

    Power iteration with persistent buffers u (in_features,) and v (out_features,), no gradient through them:
    v ← normalise(W u), u ← normalise(Wᵀ v), σ = vᵀ W u (gradient flows to W through σ). The buffers change only in
    train mode; eval mode uses the stored u, v. At construction u, v are the top singular vectors from an SVD and γ is
    initialised to σ, so Ŵ = W at step 0. Init: truncated normal, std 0.02. Source: apple/ml-sigma-reparam
    ``SNLinear`` (METHODS.md #4).

    Args:
        in_features, out_features: sizes. bias: add a bias (zeros at init). eps: normalisation floor.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, eps: float = 1e-12) -> None:
        super().__init__()
        self.in_features, self.out_features, self.eps = in_features, out_features, eps
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight, std=0.02, a=-0.04, b=0.04)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        with torch.no_grad():
            left, singular, right_t = torch.linalg.svd(self.weight.double(), full_matrices=False)
        self.register_buffer("u", right_t[0].to(self.weight.dtype).clone())  # (in_features,)
        self.register_buffer("v", left[:, 0].to(self.weight.dtype).clone())  # (out_features,)
        self.gamma = nn.Parameter(torch.tensor(float(singular[0])))

    def sigma(self) -> Tensor:
        """σ(W) ≈ vᵀ W u; in train mode first advances u, v by one power-iteration step (no grad)."""
        if self.training:
            with torch.no_grad():
                self.v.copy_(F.normalize(self.weight @ self.u, dim=0, eps=self.eps))
                self.u.copy_(F.normalize(self.weight.t() @ self.v, dim=0, eps=self.eps))
        # clones: the graph keeps this step's u, v, so a later in-place update (a second training forward before
        # backward) does not invalidate it
        return self.v.clone() @ self.weight @ self.u.clone()

    def effective_weight(self) -> Tensor:
        """Ŵ = γ / σ · W (out_features, in_features)."""
        return self.weight * (self.gamma / self.sigma())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@LAYERS.register("sigma_reparam")
class SigmaReparamAttention(SoftmaxFamilyAttention):
    """Softmax attention whose q/k/v/o projections are :class:`SigmaReparamLinear` (σReparam, METHODS.md #4).

    Bounds the logit scale through σ(W_Q), σ(W_K) and so keeps the attention entropy from collapsing. Arguments as in
    ``MaskedAttention``.
    """

    def __init__(self, hidden_size: int, num_heads: int = DEFAULT_NUM_HEADS, num_kv_heads: int | None = None, *,
                 head_dim: int | None = None, mask_mod: MaskMod | None = None,
                 path: Literal["dense", "flex"] = "dense", compiled: bool = False,
                 rope_base: float | None = 10000.0) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim=head_dim, mask_mod=mask_mod, path=path,
                         compiled=compiled, rope_base=rope_base, linear=SigmaReparamLinear)


def spectral_norm_estimate(layer: SigmaReparamLinear) -> float:
    """σ from the layer's current buffers (no update), as a float; for logging entropy-collapse runs."""
    with torch.no_grad():
        return float(layer.v @ layer.weight @ layer.u)


__all__ = ["SigmaReparamAttention", "SigmaReparamLinear", "spectral_norm_estimate"]
