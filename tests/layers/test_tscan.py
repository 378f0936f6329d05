"""TSCAN grid attention (layers/tscan.py): the loop oracle, a hand-checked case, the factorised structure, the
observed mask, the plain-sequence fallback and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.masks import causal, full, to_dense
from attnlab.functional.positions import rotary
from attnlab.functional.reference.tscan import tscan_reference
from attnlab.functional.tscan import rotate_time
from attnlab.layers import LAYERS
from attnlab.layers._common import merge_heads, split_heads
from attnlab.testing import assert_close

C = 8


def build(heads=2, kv_heads=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("mask_mod", full())
    return LAYERS.get("tscan")(C, heads, kv_heads, **kwargs).double()


def hidden(batch, length, seed=1):
    return torch.randn(batch, length, C, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def observed_cells(batch, length, seed=2):
    return torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) < 0.6


def oracle(layer, x, grid, observed=None, keep=None, time_offset=0):
    """The layer's output from its own weights, through the loop oracle (projections done here by matmul)."""
    q = split_heads(x @ layer.q_proj.weight.T, layer.num_heads)
    k = split_heads(x @ layer.k_proj.weight.T, layer.num_kv_heads)
    v = split_heads(x @ layer.v_proj.weight.T, layer.num_kv_heads)
    out, probs = tscan_reference(q, k, v, *grid, layer.time_dim, observed=observed, keep=keep,
                                 factorised=layer.factorised, rope_base=layer.rope_base, time_offset=time_offset)
    return merge_heads(out) @ layer.o_proj.weight.T, probs


CASES = [
    pytest.param({}, (3, 4), False, id="factorised-grid"),
    pytest.param({}, (3, 4), True, id="factorised-observed"),
    pytest.param({"factorised": False}, (3, 4), True, id="plain-observed"),
    pytest.param({"rope_base": None}, (4, 3), True, id="no-rope"),
    pytest.param({"kv_heads": 1}, (2, 5), True, id="gqa"),
    pytest.param({"heads": 4}, (3, 2), True, id="head_dim-2"),
    pytest.param({"heads": 1, "factorised": False}, (2, 3), False, id="head_dim-8-plain"),
]


@pytest.mark.parametrize(("kwargs", "grid", "with_observed"), CASES)
def test_output_and_probs_match_the_loop_oracle(kwargs, grid, with_observed):
    layer = build(**kwargs)
    layer.record_probs = True
    x = hidden(2, grid[0] * grid[1])
    observed = observed_cells(2, x.shape[1]) if with_observed else None
    out, state = layer(x, grid=grid, observed=observed)
    want, probs = oracle(layer, x, grid, observed)
    assert state is None
    assert_close(out, want)
    assert_close(layer.last_probs.double(), probs, dtype=torch.float32)


def test_gradients_match_the_loop_oracle():
    layer = build(kv_heads=1)
    x = hidden(1, 6).requires_grad_(True)
    observed = torch.tensor([[True, False, True, True, True, False]])
    cotangent = torch.randn(1, 6, C, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (layer(x, grid=(2, 3), observed=observed)[0] * cotangent).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    (oracle(layer, x, (2, 3), observed)[0] * cotangent).sum().backward()
    want = [x.grad] + [p.grad for p in layer.parameters()]
    for g, w in zip(got, want):
        assert_close(g, w)


def test_hand_checked_two_by_two_grid():
    """C = 2, one head (Dt = Dv = 1), identity projections, no RoPE: keys are the cells themselves, pooled."""
    layer = LAYERS.get("tscan")(2, 1, mask_mod=full(), rope_base=None).double()
    with torch.no_grad():
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
            proj.weight.copy_(torch.eye(2))
    layer.record_probs = True
    # cells (t, v): (0,0)=(1,0) (0,1)=(1,2) (1,0)=(-1,0) (1,1)=(-1,2). Row means of dim 0: +1, -1;
    # column means of dim 1: 0, 2. Query (0,1) = (1, 2): time logits ±1/√2, item logits 0 and 4/√2.
    x = torch.tensor([[[1.0, 0.0], [1.0, 2.0], [-1.0, 0.0], [-1.0, 2.0]]], dtype=torch.float64)
    out, _ = layer(x, grid=(2, 2))
    r = 2 ** -0.5
    p_time = [math.exp(r) / (math.exp(r) + math.exp(-r)), math.exp(-r) / (math.exp(r) + math.exp(-r))]
    p_item = [1 / (1 + math.exp(4 * r)), math.exp(4 * r) / (1 + math.exp(4 * r))]
    want = torch.tensor([p_time[0] * p_item[0], p_time[0] * p_item[1], p_time[1] * p_item[0],
                         p_time[1] * p_item[1]], dtype=torch.float64)
    assert_close(layer.last_probs[0, 0, 1].double(), want, dtype=torch.float32)
    expected = (want[:, None] * x[0]).sum(0)  # identity value and output projections
    assert_close(out[0, 1], expected)


def test_full_grid_probs_are_a_time_softmax_times_an_item_softmax():
    layer = build(heads=2)
    layer.record_probs = True
    layer(hidden(2, 12), grid=(4, 3))
    probs = layer.last_probs.double().view(2, 2, 12, 4, 3)  # (B, H, query, time, item)
    p_time, p_item = probs.sum(-1), probs.sum(-2)
    assert_close(probs, p_time[..., :, None] * p_item[..., None, :], dtype=torch.float32)
    # the per-token keys of the ablation do not factorise
    plain = build(heads=2, factorised=False)
    plain.record_probs = True
    plain(hidden(2, 12), grid=(4, 3))
    probs = plain.last_probs.double().view(2, 2, 12, 4, 3)
    assert (probs - probs.sum(-1)[..., None] * probs.sum(-2)[..., None, :]).abs().max() > 1e-3


@pytest.mark.parametrize("factorised", [True, False])
def test_unobserved_cells_get_no_attention_and_do_not_change_observed_outputs(factorised):
    layer = build(factorised=factorised)
    layer.record_probs = True
    x, observed = hidden(2, 12), observed_cells(2, 12)
    out, _ = layer(x, grid=(3, 4), observed=observed)
    probs = layer.last_probs
    off_diagonal = ~torch.eye(12, dtype=torch.bool)
    assert (probs[:, :, :, :][(~observed[:, None, None, :] & off_diagonal).expand_as(probs)] == 0).all()
    changed = torch.where(observed[..., None], x, x + 5.0)  # move only the unobserved cells
    out2, _ = layer(changed, grid=(3, 4), observed=observed)
    assert_close(out2[observed], out[observed])


def test_without_a_grid_the_layer_is_causal_attention_on_the_time_half():
    layer = build(mask_mod=None)  # default causal
    x = hidden(2, 7)
    out, _ = layer(x)
    want, _ = oracle(layer, x, (7, 1), keep=to_dense(causal(), 1, 1, 7, 7))
    assert_close(out, want)
    later = x.clone()
    later[:, 4:] += 1.0
    assert_close(layer(later)[0][:, :4], out[:, :4])  # no key mixes later tokens in


def test_rotate_time_rotates_each_variable_at_absolute_time_slots():
    """Token (t, v)'s time half is RoPE at position offset + t: each variable's column is its own sequence."""
    x = torch.randn(2, 3, 12, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # grid (3, 4)
    got = rotate_time(x, 3, 4, 4, offset=5, base=100.0)
    want = x.clone()
    for v in range(4):
        want[:, :, v::4, :4] = rotary(x[:, :, v::4, :4], 5, 100.0)  # positions 5, 6, 7
    assert_close(got, want)
    assert (got - rotate_time(x, 3, 4, 4, offset=0, base=100.0)).abs().max() > 1e-2  # the offset matters


class _RecordingHook:
    """A host hook that keeps the rotated q/k the layer hands to the softmax and returns the plain softmax."""

    def __init__(self):
        self.seen = {}

    def softmax(self, q, k, v, keep, scale):
        self.seen.update(q=q, k=k)
        logits = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2) * scale)
        probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
        return probs @ v.repeat_interleave(q.shape[1] // v.shape[1], 1)


def test_a_window_at_a_position_offset_rotates_at_absolute_time_slots():
    """position_offset counts tokens: a (2, 3) window at offset 6 holds time slots 2 and 3. RoPE is relative, so the
    output alone cannot show an ignored offset; the rotated queries the softmax receives can: they must equal
    ``rotary`` of the projected queries at positions 2, 3 (per variable). The output still matches the oracle."""
    layer = build()
    layer.attention_hook = hook = _RecordingHook()
    x = hidden(1, 6)
    out, _ = layer(x, grid=(2, 3), position_offset=6)
    q = split_heads(x @ layer.q_proj.weight.T, layer.num_heads)  # (1, H, 6, D), before rotation
    want_q = q.clone()
    for v in range(3):
        want_q[:, :, v::3, :layer.time_dim] = rotary(q[:, :, v::3, :layer.time_dim], 2, layer.rope_base)
    assert_close(hook.seen["q"], want_q)
    want, _ = oracle(layer, x, (2, 3), time_offset=2)
    assert_close(out, want)


@pytest.mark.parametrize("grid", [(7, 1), (13, 10)], ids=["T7-sequence", "T130-grid"])
def test_dense_and_flex_paths_agree(grid):
    """Eager Flex (CPU) against SDPA at lengths that are not a multiple of the block size, with the observed mask."""
    dense, flex = build().float(), build(path="flex").float()
    x, observed = hidden(2, grid[0] * grid[1]).float(), observed_cells(2, grid[0] * grid[1])
    with torch.no_grad():
        assert_close(flex(x, grid=grid, observed=observed)[0], dense(x, grid=grid, observed=observed)[0],
                     dtype=torch.float32)


def test_bad_inputs_raise_one_line_errors():
    layer = build()
    x = hidden(2, 12)
    with pytest.raises(ShapeError, match=r"num_times·num_vars = seq_len, got grid \(3, 5\) for 12"):
        layer(x, grid=(3, 5))
    with pytest.raises(ConfigError, match="grid as"):
        layer(x, grid=(12,))
    with pytest.raises(ConfigError, match="grid as"):
        layer(x, grid=(3.0, 4))
    with pytest.raises(ShapeError, match=r"observed as a bool tensor \(2, 12\), got torch.float32"):
        layer(x, grid=(3, 4), observed=torch.ones(2, 12))
    with pytest.raises(ShapeError, match="observed"):
        layer(x, grid=(3, 4), observed=torch.ones(2, 11, dtype=torch.bool))
    with pytest.raises(ConfigError, match="multiple of num_vars=4, got 2"):
        layer(x, grid=(3, 4), position_offset=2)
    with pytest.raises(ConfigError, match="non-causal mask_mod"):
        build(mask_mod=None)(x, grid=(3, 4))
    with pytest.raises(ConfigError, match="head_dim >= 2"):
        LAYERS.get("tscan")(C, 8)
    with pytest.raises(ConfigError, match=r"^tscan: head_dim must be an integer, got 2.5$"):
        LAYERS.get("tscan")(C, 2, head_dim=2.5)
    with pytest.raises(ConfigError, match="factorised as a bool"):
        LAYERS.get("tscan")(C, 2, factorised="yes")
    with pytest.raises(ShapeError, match="hidden_states"):
        layer(torch.randn(2, 12, C + 1, dtype=torch.float64))
