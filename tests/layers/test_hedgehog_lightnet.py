"""Hedgehog distillation on a synthetic softmax teacher; LightNet's MD-TPE on 2-D/3-D inputs."""

from __future__ import annotations

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.layers.hedgehog import HedgehogFeatureMap, distill_feature_maps
from attnlab.layers.lightnet import MDTPE, LightNetAttention


def test_distillation_reduces_kl_and_output_error():
    g = torch.Generator().manual_seed(0)
    q, k = 2 * torch.randn(1, 2, 48, 4, generator=g), 2 * torch.randn(1, 1, 48, 4, generator=g)
    v = torch.randn(1, 1, 48, 3, generator=g)
    held_out = tuple(torch.randn(x.shape, generator=g) * s for x, s in ((q, 2), (k, 2), (v, 1)))
    result = distill_feature_maps(HedgehogFeatureMap(2, 4), HedgehogFeatureMap(1, 4), q, k, v, steps=60, lr=3e-2,
                                  eval_inputs=held_out)
    assert result.kl_after < 0.7 * result.kl_before
    assert result.output_error_after < result.output_error_before
    assert result.eval_kl_after >= 0 and result.eval_output_error_after >= 0  # random held-out: no claim
    assert len(result.losses) == 60 and result.losses[-1] < result.losses[0]
    with pytest.raises(ConfigError):
        distill_feature_maps(HedgehogFeatureMap(2, 4), HedgehogFeatureMap(1, 4), q, k, v, steps=-1)
    with pytest.raises(ShapeError):
        distill_feature_maps(HedgehogFeatureMap(2, 4), HedgehogFeatureMap(2, 4), q, k, v)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2)])
def test_lightnet_spatial_inputs(shape):
    torch.manual_seed(0)
    layer = LightNetAttention(8, num_heads=2, gate_low_rank_dim=4, num_spatial_dims=len(shape), chunk_size=4)
    x = torch.randn(2, int(torch.tensor(shape).prod()), 8)
    out, (state, z) = layer(x, spatial_shape=shape)
    assert out.shape == x.shape and torch.isfinite(out).all() and state.shape == (2, 2, 4, 4)
    with pytest.raises(ShapeError):
        layer(x, spatial_shape=(5, 5))
    with pytest.raises(ShapeError, match="spatial_shape"):
        layer(x)  # MD-TPE configured: silently skipping it is an error


@pytest.mark.parametrize("causal", [False, True])
def test_lightnet_causal_tpe(causal):
    """Changing the last pixel of a 3x4 grid changes earlier outputs only through the bidirectional MD-TPE."""
    torch.manual_seed(0)
    layer = LightNetAttention(8, num_heads=2, gate_low_rank_dim=4, num_spatial_dims=2, causal_tpe=causal,
                              chunk_size=4).double()
    with torch.no_grad():
        for mlp in layer.tpe.kernels:
            mlp[2].bias.fill_(0.5)  # a constant kernel: every position mixes its axis neighbours
    x = torch.randn(1, 12, 8, dtype=torch.float64)
    changed = x.clone()
    changed[:, -1] += 1.0
    a, _ = layer(x, spatial_shape=(3, 4))
    b, _ = layer(changed, spatial_shape=(3, 4))
    assert torch.equal(a[:, :-1], b[:, :-1]) == causal


def test_mdtpe_starts_as_identity_and_mixes_along_each_axis():
    tpe = MDTPE(3, num_dims=2)
    x = torch.randn(1, 4, 5, 3)
    torch.testing.assert_close(tpe(x), x)
    with torch.no_grad():
        tpe.kernels[0][2].bias.fill_(1.0)  # constant kernel along axis 1: adds the column sums
    torch.testing.assert_close(tpe(x), x + x.sum(1, keepdim=True))
    with pytest.raises(ConfigError):
        MDTPE(3, num_dims=4)
