"""historical_prediction (HPNet's historical prediction attention): a float64 loop oracle, a hand-checked case, the
look-back window, tracks, gradients, the dense/Flex paths and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional import masks as M
from attnlab.layers import LAYERS
from attnlab.testing import assert_close

C, H, T = 12, 3, 7
NAME = "historical_prediction"


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = LAYERS.get(NAME)(C, H, **kwargs).double()
    with torch.no_grad():
        layer.relative_key.normal_(0.0, 0.5)  # a table that matters
    return layer


def _x(seed=1, batch=2, length=T):
    return torch.randn(batch, length, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def oracle(layer, x, times=None, track_ids=None):
    """Plain loops in float64 from the module docstring: logits_ij = q_i · (k_j + r[min(Δ, R − 1)]) / √D over the
    keys with 0 ≤ Δ ≤ max_distance on the same track (and j ≤ i when the layer mask is causal). Query head h reads
    kv head h // (H / Hkv)."""
    B, L, _ = x.shape
    D, R, Hkv = layer.head_dim, layer.num_distances, layer.num_kv_heads
    q = (x @ layer.q_proj.weight.T).view(B, L, H, D)
    k = (x @ layer.k_proj.weight.T).view(B, L, Hkv, D)
    v = (x @ layer.v_proj.weight.T).view(B, L, Hkv, D)
    out = torch.zeros(B, L, H, D, dtype=x.dtype)
    for b in range(B):
        t = list(range(L)) if times is None else times[min(b, times.shape[0] - 1)].tolist()
        ids = [0] * L if track_ids is None else track_ids[min(b, track_ids.shape[0] - 1)].tolist()
        for h in range(H):
            for i in range(L):
                visible, logits = [], []
                for j in range(L):
                    delta = t[i] - t[j]
                    if delta < 0 or ids[i] != ids[j] or (layer._plain_causal and j > i):
                        continue
                    if layer.max_distance is not None and delta > layer.max_distance:
                        continue
                    key = k[b, j, h // (H // Hkv)] + layer.relative_key[min(delta, R - 1), h]
                    visible.append(j)
                    logits.append((q[b, i, h] * key).sum() / math.sqrt(D))
                probs = torch.softmax(torch.stack(logits), dim=0)
                out[b, i, h] = sum(p * v[b, j, h // (H // Hkv)] for p, j in zip(probs, visible))
    return out.reshape(B, L, H * D) @ layer.o_proj.weight.T


def test_registered_with_defaults():
    cls = LAYERS.get(NAME)
    layer = cls.from_config({"hidden_size": 16, "window": 5, "chunk_size": 4}, strict=False)
    assert (layer.num_heads, layer.max_distance, layer.num_distances, layer.rope_base) == (4, None, 16, None)
    assert layer.relative_key.shape == (16, 4, 4) and cls.__doc__.strip()


@pytest.mark.parametrize("kwargs", [{}, {"max_distance": 2}, {"max_distance": 0}, {"num_distances": 3},
                                    {"num_kv_heads": 1, "max_distance": 3}],
                         ids=["causal", "window-2", "self-only", "clamped-table", "mqa"])
def test_layer_matches_loop_oracle_and_its_gradients(kwargs):
    layer, x = build(**kwargs), _x().requires_grad_()
    out = layer(x)[0]
    want = oracle(layer, x)
    assert_close(out, want)
    cotangent = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, layer.relative_key, layer.q_proj.weight], cotangent)
    expected = torch.autograd.grad(want, [x, layer.relative_key, layer.q_proj.weight], cotangent)
    for g, e in zip(got, expected):
        assert_close(g, e)


@pytest.mark.parametrize("kv_heads", [None, 1], ids=["mha", "mqa"])
def test_times_and_tracks_match_the_oracle(kv_heads):
    layer, x = build(max_distance=3, num_kv_heads=kv_heads), _x(seed=4)
    times = torch.tensor([[0, 0, 1, 2, 2, 3, 5], [0, 1, 1, 2, 4, 4, 6]])
    tracks = torch.tensor([[0, 1, 0, 0, 1, 1, 0], [2, 2, 0, 2, 0, 2, 0]])
    with torch.no_grad():
        assert_close(layer(x, times=times, track_ids=tracks)[0], oracle(layer, x, times, tracks))
        assert_close(layer(x, times=times[:1])[0], oracle(layer, x, times[:1]))  # one row for the batch


def test_hand_checked_case():
    """C = H = D = 1, identity projections, k = 0: logits of the last query are x · r[Δ] = ln 3, ln 2, 0 for
    Δ = 2, 1, 0, so probs are 3/6, 2/6, 1/6 on values 5, 8, 1: output (15 + 16 + 1) / 6 = 16/3. With
    max_distance=1 only Δ = 1, 0 remain: (2·8 + 1) / 3 = 17/3."""
    for max_distance, want in ((None, 16 / 3), (1, 17 / 3)):
        layer = LAYERS.get(NAME)(1, 1, max_distance=max_distance, num_distances=3).double()
        with torch.no_grad():
            layer.q_proj.weight.fill_(1.0)
            layer.k_proj.weight.zero_()
            layer.v_proj.weight.fill_(1.0)
            layer.o_proj.weight.fill_(1.0)
            layer.relative_key.copy_(torch.tensor([0.0, math.log(2), math.log(3)], dtype=torch.float64).view(3, 1, 1))
            out = layer(torch.tensor([[[5.0], [8.0], [1.0]]], dtype=torch.float64))[0]
        assert out[0, 2, 0].item() == pytest.approx(want, abs=1e-12)
        assert out[0, 0, 0].item() == pytest.approx(5.0, abs=1e-12)  # the first query sees only itself


def test_interleaved_tracks_equal_each_track_alone():
    """Two (agent, mode) tracks interleaved in one sequence with times and track_ids == each track run alone."""
    layer = build(max_distance=4)
    a, b = _x(seed=5, batch=1, length=4), _x(seed=6, batch=1, length=4)
    mixed = torch.stack([a[0], b[0]], dim=1).reshape(1, 8, C)  # a0 b0 a1 b1 …
    times = torch.arange(4).repeat_interleave(2)[None]
    tracks = torch.tensor([[0, 1] * 4])
    with torch.no_grad():
        out = layer(mixed, times=times, track_ids=tracks)[0].view(1, 4, 2, C)
        assert_close(out[:, :, 0], layer(a)[0])
        assert_close(out[:, :, 1], layer(b)[0])


def test_self_only_window_is_a_per_token_map():
    """max_distance=0: each token attends to itself alone, so its output is o_proj(v_proj(x_i)) whatever the rest."""
    layer, x = build(max_distance=0), _x(seed=7)
    with torch.no_grad():
        want = x @ layer.v_proj.weight.T @ layer.o_proj.weight.T
        assert_close(layer(x)[0], want)


def test_later_tokens_never_change_earlier_outputs_even_with_a_full_layer_mask():
    layer, x = build(mask_mod=M.full()), _x(seed=8)
    changed = x.clone()
    changed[:, 4:] += 1.0
    with torch.no_grad():
        assert_close(layer(changed)[0][:, :4], layer(x)[0][:, :4])


def test_position_offset_keeps_the_relative_encoding():
    """Positions only shift the (causal) layer mask: without RoPE a chunk at an offset gives the same output."""
    layer, x = build(), _x(seed=9)
    with torch.no_grad():
        assert_close(layer(x, position_offset=5)[0], layer(x)[0])


def test_dense_and_flex_paths_agree():
    layer, x = build(max_distance=3), _x(seed=10)
    times, tracks = torch.tensor([[0, 1, 1, 2, 3, 4, 4]]), torch.tensor([[0, 0, 1, 0, 1, 0, 1]])
    with torch.no_grad():
        dense = layer(x, times=times, track_ids=tracks)[0]
        layer.path = "flex"
        assert_close(layer(x, times=times, track_ids=tracks)[0], dense)


@pytest.mark.parametrize(("kwargs", "match"), [({"max_distance": -1}, "max_distance"),
                                               ({"max_distance": 1.5}, "max_distance"),
                                               ({"num_distances": 0}, "num_distances"),
                                               ({"num_distances": 2.5},
                                                r"^historical_prediction: num_distances must be an integer, got 2.5$")])
def test_bad_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LAYERS.get(NAME)(C, H, **kwargs)


def test_bad_times_and_track_ids():
    layer, x = build(), _x()
    with pytest.raises(ShapeError, match=r"expected times of shape \(2, 7\)"):
        layer(x, times=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ShapeError, match="track_ids"):
        layer(x, track_ids=torch.zeros(3, 7, dtype=torch.long))
    with pytest.raises(ConfigError, match="integer"):
        layer(x, times=torch.zeros(2, 7))
