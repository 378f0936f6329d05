"""Softmax-family layers: against their functional oracles, dense vs Flex, gates, σReparam buffers, causality."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional import masks as M
from attnlab.functional.reference.softmax_family import relu_rows, sigmoid_rows, softmax_rows
from attnlab.layers import LAYERS
from attnlab.layers._common import merge_heads
from attnlab.layers.sigma_reparam import SigmaReparamLinear
from attnlab.testing import assert_close

C, H, HKV, T = 16, 4, 2, 11
NAMES = ["masked", "gated", "sigmoid", "relu", "sigma_reparam", "alibi", "decay_matrix", "dma", "moda",
         "deconstructed"]
EXTRA = {"decay_matrix": dict(grid_width=4), "dma": dict(window=4), "moda": dict(), "deconstructed": dict()}


def build(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = LAYERS.get(name)(C, H, HKV, **{**EXTRA.get(name, {}), **kwargs}).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def _x(seed=1, T=T):
    return torch.randn(2, T, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_registered_shape_finite_and_trainable(name):
    layer = build(name)
    assert name in LAYERS.names() and LAYERS.get(name).__doc__.strip()
    x = _x().requires_grad_()
    if name == "moda":  # tokens 0..4 in the aligned group (e.g. image), the rest text
        out, state = layer(x, group_ids=(torch.arange(T) >= 5).long().logical_not().long().expand(2, T))
    else:
        out, state = layer(x)
    assert out.shape == x.shape and state is None and torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", NAMES)
def test_causal_layers_ignore_future_tokens(name):
    layer = build(name).eval()  # eval: σReparam's power iteration must not move between the two calls
    x = _x()
    y = x.clone()
    y[:, 7:] = torch.randn_like(y[:, 7:])
    # MODA: both groups present, so the key alignment runs (gain is non-zero after build's perturbation)
    extra = {"group_ids": (torch.arange(T) % 3 == 0).long().expand(2, T)} if name == "moda" else {}
    with torch.no_grad():
        torch.testing.assert_close(layer(x, **extra)[0][:, :7], layer(y, **extra)[0][:, :7])


def _oracle_heads(layer, x, rows):
    q, k, v, extra = layer.project(x)
    keep = M.to_dense(layer.mask_mod, x.shape[0], H, T, T)
    return rows(q, k, v, keep), extra


@pytest.mark.parametrize("name,rows", [
    ("masked", softmax_rows), ("sigma_reparam", softmax_rows), ("relu", relu_rows),
    ("sigmoid", lambda q, k, v, keep: sigmoid_rows(q, k, v, keep, bias=-math.log(T))),
])
def test_layer_matches_row_oracle(name, rows):
    layer = build(name, mask_mod=M.sliding_window(4))
    layer.eval()
    x = _x()
    with torch.no_grad():
        heads, _ = _oracle_heads(layer, x, rows)
        assert_close(layer(x)[0], layer.o_proj(merge_heads(heads)))


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_gated_output_is_attention_times_sigmoid_gate(gate):
    layer = build("gated", gate=gate)
    x = _x()
    with torch.no_grad():
        heads, extra = _oracle_heads(layer, x, softmax_rows)
        scores = torch.sigmoid(extra).view(2, T, H, -1).transpose(1, 2)
        assert scores.shape[-1] == (C // H if gate == "elementwise" else 1)
        assert_close(layer(x)[0], layer.o_proj(merge_heads(heads * scores)))
        n = layer.num_heads * layer.head_dim
        layer.q_proj.weight[n:] = 0  # gate logits 0: the gate halves the ungated output
        heads, _ = _oracle_heads(layer, x, softmax_rows)
        assert_close(layer(x)[0], layer.o_proj(merge_heads(heads * 0.5)))


@pytest.mark.parametrize("mask", ["sink_window", "ls_heads", "shifted_groups"])
def test_dense_and_flex_layers_agree(mask):
    params = {"sink_window": dict(num_sink_tokens=2, window=3), "ls_heads": dict(window=3, num_local_heads=2),
              "shifted_groups": dict(group_size=4, num_heads=H, num_sink_tokens=1)}[mask]
    dense = LAYERS.get("masked").from_mask(mask, params, C, H, HKV).double()
    flex = LAYERS.get("masked").from_mask(mask, params, C, H, HKV, path="flex").double()
    flex.load_state_dict(dense.state_dict())
    x = _x()
    with torch.no_grad():
        assert_close(flex(x)[0], dense(x)[0])
        assert_close(flex(x[:, :5])[0], dense(x[:, :5])[0])  # another length: another block mask
    assert flex.block_masks.builds == 2


def test_flex_path_refuses_autograd():
    layer = LAYERS.get("masked")(C, H, HKV, path="flex")
    with pytest.raises(NotImplementedError, match="dense"):
        layer(_x().float().requires_grad_())


def test_sigma_reparam_linear_starts_as_plain_linear_and_tracks_spectral_norm():
    torch.manual_seed(0)
    layer = SigmaReparamLinear(12, 7).double()
    x = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ layer.weight.t())  # Ŵ = W at step 0 (γ = σ from the SVD)
    u0 = layer.u.clone()
    layer.eval()
    layer(x)
    assert torch.equal(layer.u, u0)  # eval mode never touches the buffers
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))  # a new W: σ must be re-estimated
    layer.train()
    layer(x)
    assert not torch.equal(layer.u, u0)  # one power-iteration step per training forward
    for _ in range(200):
        layer(x)
    true_sigma = torch.linalg.matrix_norm(layer.weight, ord=2)
    torch.testing.assert_close(layer.sigma(), true_sigma, rtol=1e-6, atol=1e-9)
    layer.zero_grad()
    layer(x).sum().backward()
    assert layer.gamma.grad is not None and layer.weight.grad is not None and not layer.u.requires_grad


def test_sigma_reparam_two_training_forwards_then_one_backward():
    """The power-iteration buffers change in place on every training forward; backward must still work."""
    layer = SigmaReparamLinear(5, 3).double().train()
    x = torch.randn(4, 5, dtype=torch.float64)
    first = layer(x)
    u_first, v_first = layer.u.clone(), layer.v.clone()
    second = layer(x)
    (first.sum() + second.sum()).backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    # the first output used the first step's u, v: γ/σ · W with σ = vᵀ W u from those buffers
    with torch.no_grad():
        expected = x @ (layer.weight * (layer.gamma / (v_first @ layer.weight @ u_first))).t()
    torch.testing.assert_close(first.detach(), expected)


def test_bad_configs():
    with pytest.raises(ConfigError):
        LAYERS.get("masked")(C, 4, 3)
    with pytest.raises(ConfigError):
        LAYERS.get("gated")(C, 4, gate="channel")
    with pytest.raises(ConfigError):
        LAYERS.get("masked")(C, 4, path="sparse")
    with pytest.raises(ShapeError):
        LAYERS.get("masked")(C, 4)(torch.randn(2, 3, C + 1))


def test_dma_with_zero_scale_and_wide_window_is_masked_attention():
    dma = build("dma", window=T)
    with torch.no_grad():
        dma.log_scale.zero_()  # A = 0: bias 0; window ≥ T: nothing dropped
        heads, _ = _oracle_heads(dma, _x(), softmax_rows)
        assert_close(dma(_x())[0], dma.o_proj(merge_heads(heads)))


def test_dma_dense_and_flex_agree_with_small_window():
    dense = build("dma", window=3)
    flex = build("dma", window=3, path="flex")
    with torch.no_grad():
        dense.log_scale.fill_(0.7)
        flex.load_state_dict(dense.state_dict())
        assert_close(flex(_x())[0], dense(_x())[0])


def test_data_dependent_flex_masks_are_not_kept_in_the_layer_cache():
    """DMA's top-w and MODA's group masks change every call: caching them only pins (B, H, T, T) tables."""
    ids = (torch.arange(T) % 3 == 0).long().expand(2, T)
    for name, extra in (("dma", {}), ("moda", {"group_ids": ids})):
        layer = build(name, path="flex")
        with torch.no_grad():
            layer(_x(), **extra)
            layer(_x(2), **extra)
        assert layer.block_masks.builds == 0 and len(layer.block_masks._entries) == 0
    plain = build("masked", path="flex")
    with torch.no_grad():
        plain(_x())
        plain(_x(2))
    assert plain.block_masks.builds == 1  # the fixed mask is still built once and reused


def test_alibi_dense_and_flex_agree():
    dense, flex = build("alibi"), build("alibi", path="flex")
    flex.load_state_dict(dense.state_dict())
    with torch.no_grad():
        assert_close(flex(_x())[0], dense(_x())[0])


def test_decay_matrix_layer_matches_cace_oracle():
    from attnlab.functional.reference.softmax_family import chebyshev_decay_rows

    layer = build("decay_matrix", mask_mod=M.full())
    x = _x(T=12)
    with torch.no_grad():
        q, k, v, _ = layer.project(x)
        heads = chebyshev_decay_rows(q, k, v, 4, [1 - 2 ** (-5 - h) for h in range(H)])
        assert_close(layer(x)[0], layer.o_proj(merge_heads(heads)))


def test_moda_identity_at_init_and_group_mask():
    layer = build("moda")
    with torch.no_grad():
        layer.gain.zero_()
        layer.fuse.weight.copy_(torch.eye(layer.head_dim))
        x = _x()
        ids = (torch.arange(T) % 3 == 0).long().expand(2, T)
        assert_close(layer(x, group_ids=ids)[0], layer(x)[0])  # r = 0, W_fuse = I: alignment is the identity
        only_own = torch.eye(2, dtype=torch.bool)
        layer.allowed.copy_(only_own)
        heads, _ = _oracle_heads(layer, x, lambda q, k, v, keep: softmax_rows(
            q, k, v, keep & (ids[:, None, :, None] == ids[:, None, None, :])))
        assert_close(layer(x, group_ids=ids)[0], layer.o_proj(merge_heads(heads)))


def test_moda_align_keys_known_answer():
    from attnlab.functional.moda import align_keys

    key = torch.tensor([[[[3.0, 4.0], [1.0, 0.0]]]], dtype=torch.float64)  # token 0 text, token 1 aligned group
    value = torch.tensor([[[[0.0, 2.0], [5.0, 5.0]]]], dtype=torch.float64)
    fuse = torch.nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        fuse.weight.copy_(torch.eye(2))
    gain = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # unit text key (0.6, 0.8); basis = rows of outer((0.6, 0.8), (0, 2)) normalised = [[0, 1], [0, 1]]
    # unit aligned key (1, 0) @ basis = (0, 1); new key = (1, 0) + (0, 1)
    out = align_keys(key, value, torch.tensor([[0, 1]]), gain, fuse, eps=0.0)  # eps 0: exact unit vectors
    assert_close(out[0, 0], torch.tensor([[3.0, 4.0], [1.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("name", ["masked", "relu", "dma"])
def test_position_offset_reaches_absolute_position_masks(name):
    """A chunk at positions 3…6 under "keys at positions < 3 are hidden" sees all its keys (causally)."""
    def from_three(b, h, q, kv):
        return (kv <= q) & (kv >= 3)

    extra = {"window": 16} if name == "dma" else {}
    shifted = build(name, mask_mod=from_three, rope_base=None, **extra)
    plain = build(name, rope_base=None, **extra)  # causal, same weights (same seed)
    x = _x(T=4)
    with torch.no_grad():
        assert_close(shifted(x, position_offset=3)[0], plain(x)[0])
        assert shifted(x)[0][:, :3].abs().max() == 0  # at offset 0 rows 0-2 see nothing
    table = M.from_keep(torch.ones(4, 4, dtype=torch.bool).tril()[None, None])
    with pytest.raises(ShapeError, match="built for"):  # a 4-token table cannot serve positions 3…6
        build(name, mask_mod=table, rope_base=None, **extra)(x, position_offset=3)


def test_head_dependent_masks_must_match_the_layer_heads():
    from attnlab.functional import sparse_masks as S

    with pytest.raises(ConfigError, match="num_heads == 8"):  # split at 8 // 2 would make every head unshifted
        build("masked", mask_mod=S.shifted_groups(4, 8))
    with pytest.raises(ConfigError, match="num_heads >= 6"):  # every one of the 4 heads would be local
        build("masked", mask_mod=M.and_masks(M.causal(), M.ls_heads(3, 6)))
    build("masked", mask_mod=S.shifted_groups(4, H))
    build("masked", mask_mod=M.ls_heads(3, H))


def test_moda_causal_basis_uses_only_earlier_text_tokens():
    from attnlab.functional.moda import align_keys

    key = torch.tensor([[[[1.0, 0.0], [3.0, 4.0]]]], dtype=torch.float64)  # token 0 aligned group, token 1 text
    value = torch.tensor([[[[5.0, 5.0], [0.0, 2.0]]]], dtype=torch.float64)
    fuse = torch.nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        fuse.weight.copy_(torch.eye(2))
    gain, ids = torch.ones(2, dtype=torch.float64), torch.tensor([[1, 0]])
    # no text token at or before position 0: the prefix basis is 0 and key 0 is unchanged
    assert_close(align_keys(key, value, ids, gain, fuse, causal=True)[0, 0], key[0, 0])
    # whole-sequence basis (released code): key 0 picks up the later text token, (1, 0) + (0, 1)
    assert_close(align_keys(key, value, ids, gain, fuse, eps=0.0)[0, 0, 0], torch.tensor([1.0, 1.0],
                                                                                         dtype=torch.float64))
    assert build("moda").causal_basis and not build("moda", mask_mod=M.full()).causal_basis


@pytest.mark.parametrize("source", ["fixed_sequence", "static"])
def test_deconstructed_fixed_pattern_makes_layer_linear_in_hidden_states(source):
    """With Q/K not read from the hidden states the pattern is fixed, so the layer is linear in hidden_states."""
    layer = build("deconstructed", qk_source=source)
    x1, x2 = _x(1), _x(2)
    extra = {"static_states": _x(3)} if source == "static" else {}
    with torch.no_grad():
        assert_close(layer(x1 + x2, **extra)[0], layer(x1, **extra)[0] + layer(x2, **extra)[0])
    hidden = build("deconstructed")
    with torch.no_grad():
        assert not torch.allclose(hidden(x1 + x2)[0], hidden(x1)[0] + hidden(x2)[0])
    if source == "static":
        with pytest.raises(ShapeError):
            layer(x1)
