"""The ``decoupled`` layer (DARE): against a float64 loop oracle, the search stage, the target mask, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import PretrainedConfig

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.masks import causal, to_dense
from attnlab.lab.hosting import AttentionSite
from attnlab.layers import LAYERS
from attnlab.layers.decoupled import DecoupledAttention, search_keep, target_mask
from attnlab.testing import assert_close

C, H, T = 16, 4, 9


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    return DecoupledAttention(C, H, **{"rope_base": None, **kwargs}).double()


def states(width=C, seed=1, length=T):
    return torch.randn(2, length, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def oracle(layer, hidden, attention, keep, top_k=None):
    """Loop form: per (b, i), the keys j with keep[i, j]; search = top_k of Σ_h q·k/√D; per-head softmax."""
    Hq, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = attention @ layer.q_proj.weight.T if layer.projections == "linear" else attention
    k = attention @ layer.k_proj.weight.T if layer.projections == "linear" else attention
    v = hidden @ layer.v_proj.weight.T if layer.projections == "linear" else hidden
    B, L, _ = hidden.shape
    rows = []
    for b in range(B):
        for i in range(L):
            visible = [j for j in range(L) if keep[i, j]]
            if top_k is not None:
                qd, kd = q.detach(), k.detach()
                score = {j: sum(float(qd[b, i, h * D:(h + 1) * D] @ kd[b, j, (h // (Hq // Hkv)) * D:
                                                                           (h // (Hq // Hkv) + 1) * D])
                                for h in range(Hq)) for j in visible}
                visible = sorted(visible, key=lambda j: -score[j])[:top_k]
            heads = []
            for h in range(Hq):
                g = h // (Hq // Hkv)
                logits = torch.stack([q[b, i, h * D:(h + 1) * D] @ k[b, j, g * D:(g + 1) * D] for j in visible])
                probs = torch.softmax(logits / math.sqrt(D), dim=0)
                heads.append(sum(p * v[b, j, g * D:(g + 1) * D] for p, j in zip(probs, visible)))
            rows.append(torch.cat(heads))
    merged = torch.stack(rows).view(B, L, Hq * D)
    return merged @ layer.o_proj.weight.T if layer.projections == "linear" else merged


CASES = {
    "causal": dict(kwargs={}, mask=None),
    "gqa-top3": dict(kwargs={"num_kv_heads": 2, "top_k": 3}, mask=None),
    "narrow-attention-top4": dict(kwargs={"attention_size": 6, "top_k": 4}, mask=None),
    "target-top2": dict(kwargs={"top_k": 2}, mask=6),
    "no-projections-target-top3": dict(kwargs={"projections": "none", "top_k": 3}, mask=6),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_output_and_gradients_match_the_loop_oracle(case):
    kwargs, behaviours = CASES[case]["kwargs"], CASES[case]["mask"]
    mask_mod = causal() if behaviours is None else target_mask(behaviours)
    layer = build(**kwargs, mask_mod=mask_mod)
    hidden = states().requires_grad_()
    attention = states(layer.attention_size, seed=2).requires_grad_()
    out, state = layer(hidden, attention_states=attention)
    keep = to_dense(mask_mod, 1, 1, T, T)[0, 0]
    want = oracle(layer, hidden, attention, keep, layer.top_k)
    assert state is None
    assert_close(out, want)
    cotangent = states(seed=3)
    got = torch.autograd.grad((out * cotangent).sum(), (hidden, attention))
    expected = torch.autograd.grad((want * cotangent).sum(), (hidden, attention))
    for g, e in zip(got, expected):
        assert_close(g, e)


def test_a_hand_checked_candidate_with_search():
    """One head, no projections, C = 2: behaviours a0=(1,0), a1=(0,2), a2=(2,0); candidate a3=(1,0)."""
    layer = DecoupledAttention(2, 1, projections="none", top_k=2, mask_mod=target_mask(3), rope_base=None).double()
    attention = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [2.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    hidden = torch.tensor([[[10.0, 0.0], [0.0, 10.0], [0.0, 20.0], [5.0, 5.0]]], dtype=torch.float64)
    out, _ = layer(hidden, attention_states=attention)
    # candidate scores with scale 1/√2: a0 → 1/√2, a1 → 0, a2 → 2/√2; top-2 keeps a0 and a2
    p0 = 1.0 / (1.0 + math.exp(1.0 / math.sqrt(2)))  # softmax over (1/√2, 2/√2)
    expected_candidate = torch.tensor([p0 * 10.0, (1 - p0) * 20.0], dtype=torch.float64)
    assert_close(out[0, 3], expected_candidate)
    assert_close(out[0, :3], hidden[0, :3])  # behaviour rows see only themselves
    scores = layer.search_scores(hidden, attention_states=attention)[0, 3]
    assert_close(scores[:3], torch.tensor([1 / math.sqrt(2), 0.0, math.sqrt(2)]).float())
    assert scores[3] == float("-inf")


def test_attention_states_only_choose_the_weights():
    """Equal value rows give the same output whatever the attention states: they only weight, never add content."""
    layer = build(top_k=3)
    hidden = states()[:, :1].expand(2, T, C).contiguous()
    first, _ = layer(hidden, attention_states=states(seed=4))
    second, _ = layer(hidden, attention_states=states(seed=5))
    assert_close(first, second)
    other, _ = layer(states(), attention_states=states(seed=4))
    assert not torch.allclose(first, other)


def test_without_attention_states_it_is_masked_attention():
    layer = build(rope_base=10000.0)
    masked = LAYERS.get("masked")(C, H).double()
    masked.load_state_dict(layer.state_dict())
    x = states()
    assert_close(layer(x)[0], masked(x)[0])
    assert_close(layer(x)[0], layer(x, attention_states=x)[0])


def test_search_stage_ignores_keys_outside_the_top_k_and_is_off_at_full_width():
    layer = build(top_k=2, projections="none", mask_mod=target_mask(6))
    hidden, attention = states(), states(seed=2)
    scores = layer.search_scores(hidden, attention_states=attention)
    worst = scores[0, 7, :6].argmin()  # candidate 7's lowest-ranked behaviour
    changed = hidden.clone()
    changed[0, worst] += 5.0  # its value (what the representation embedding holds) changes
    before = layer(hidden, attention_states=attention)[0][0, 7]
    assert_close(layer(changed, attention_states=attention)[0][0, 7], before)
    full = build(top_k=T, projections="none", mask_mod=target_mask(6))
    plain = build(projections="none", mask_mod=target_mask(6))
    assert_close(full(hidden, attention_states=attention)[0], plain(hidden, attention_states=attention)[0])


def test_a_keep_tensor_acts_like_the_same_layer_mask():
    """The target layout passed per call (keep, ANDed with the causal mask it lies inside) = built into the layer."""
    per_call = build(top_k=2, projections="none")
    built_in = build(top_k=2, projections="none", mask_mod=target_mask(6))
    keep = to_dense(target_mask(6), 1, 1, T, T)
    hidden, attention = states(), states(seed=2)
    assert_close(per_call(hidden, attention_states=attention, keep=keep)[0],
                 built_in(hidden, attention_states=attention)[0])
    assert torch.equal(per_call.search_scores(hidden, attention_states=attention, keep=keep),
                       built_in.search_scores(hidden, attention_states=attention))


def test_keep_forms_follow_the_per_call_convention():
    """(B, T, T) is one mask per sequence (each sequence alone with its (T, T) mask gives the same rows), and the
    4-D form broadcast over heads is the same mask."""
    layer = build(top_k=3)
    hidden, attention = states(), states(seed=2)
    keep = (torch.rand(2, T, T, generator=torch.Generator().manual_seed(6)) > 0.5) | torch.eye(T, dtype=torch.bool)
    out = layer(hidden, attention_states=attention, keep=keep)[0]
    probs = layer.attention_probs(hidden, attention_states=attention, keep=keep)
    for b in range(2):
        alone = dict(attention_states=attention[b:b + 1], keep=keep[b])
        assert_close(out[b:b + 1], layer(hidden[b:b + 1], **alone)[0])
        assert_close(probs[b:b + 1], layer.attention_probs(hidden[b:b + 1], **alone), dtype=torch.float32)
    four = keep[:, None].expand(2, H, T, T)
    assert_close(layer(hidden, attention_states=attention, keep=four)[0], out)
    assert not torch.allclose(layer(hidden, attention_states=attention, keep=keep.flip(0))[0], out)


def test_attention_probs_weight_the_values_into_the_output():
    layer = build(top_k=3, projections="none", mask_mod=target_mask(6))
    hidden, attention = states(), states(seed=2)
    probs = layer.attention_probs(hidden, attention_states=attention)  # (B, H, T, T)
    assert probs.shape == (2, H, T, T) and probs.dtype == torch.float32
    assert_close(probs.sum(-1), torch.ones(2, H, T), dtype=torch.float32)
    assert ((probs > 0).sum(-1)[:, :, 6:] == 3).all()  # each candidate row keeps exactly top_k = 3 behaviours
    values = hidden.view(2, T, H, C // H).transpose(1, 2)  # no projections: head h reads slice h
    mixed = (probs.double() @ values).transpose(1, 2).reshape(2, T, C)
    assert_close(mixed, layer(hidden, attention_states=attention)[0], dtype=torch.float32)


@pytest.mark.parametrize("length", [7, 130])
def test_dense_and_flex_paths_agree(length):
    """Eager Flex (CPU) against SDPA with the search stage and the target layout passed as keep, at lengths that are
    not a multiple of the block size."""
    keep = to_dense(target_mask(length - 3), 1, 1, length, length)
    dense, flex = build(top_k=3).float(), build(top_k=3, path="flex").float()
    hidden, attention = states(length=length).float(), states(seed=2, length=length).float()
    with torch.no_grad():
        assert_close(flex(hidden, attention_states=attention, keep=keep)[0],
                     dense(hidden, attention_states=attention, keep=keep)[0], dtype=torch.float32)


def test_target_mask_layout():
    dense = to_dense(target_mask(2), 1, 1, 4, 4)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(dense, expected)


def test_search_keep_by_hand():
    inf = float("-inf")
    scores = torch.tensor([[[0.5, 2.0, -1.0, 1.0], [3.0, inf, inf, inf]]])
    keep = search_keep(scores, 2)
    assert keep.tolist() == [[[False, True, False, True], [True, False, False, False]]]


def test_the_search_reaches_the_host_softmax():
    """Through an AttentionSite (sdpa via transformers) the output equals the layer's own path."""
    layer = build(top_k=3, mask_mod=target_mask(6)).float()
    config = PretrainedConfig()
    config._attn_implementation = "sdpa"
    site = AttentionSite(config, 0, layer, is_causal=False)
    hidden, attention = states().float(), states(seed=2).float()
    with torch.no_grad():
        hooked = site(hidden, attention_states=attention)
        object.__setattr__(layer, "attention_hook", None)
        own = layer(hidden, attention_states=attention)[0]
    assert_close(hooked, own, dtype=torch.float32)


@pytest.mark.parametrize("kwargs, match", [
    ({"projections": "bilinear"}, "projections"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_k": 2.5}, r"^decoupled: top_k must be an integer, got 2.5$"),
    ({"attention_size": 0}, "attention_size"),
    ({"projections": "none", "attention_size": 8, "rope_base": None}, "attention_size == hidden_size"),
    ({"projections": "none", "num_kv_heads": 2, "rope_base": None}, "num_kv_heads == num_heads"),
    ({"projections": "none"}, r"^expected rope_base=None with projections='none' .*got rope_base=10000.0$"),
    ({"projections": "none", "rope_base": 500.0}, "rope_base=500.0"),
])
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DecoupledAttention(C, H, **kwargs)


def test_bad_inputs_raise():
    layer = build(attention_size=6)
    with pytest.raises(ShapeError, match="attention_states"):
        layer(states(), attention_states=states(width=C))
    with pytest.raises(ShapeError, match="attention_states"):
        layer(states(), attention_states=states(width=6, length=T - 1))
    with pytest.raises(ShapeError, match="attention_states"):
        layer(states(), attention_states=states(width=6).float())
    with pytest.raises(ShapeError, match="hidden_states"):
        layer(states(width=C + 1))
    with pytest.raises(ShapeError, match=r"keep as bool \(9, 9\), \(2, 9, 9\) or broadcastable"):
        layer(states(), attention_states=states(width=6), keep=torch.ones(2, 2, T, T, dtype=torch.bool))
    with pytest.raises(ShapeError, match="keep"):
        layer(states(), attention_states=states(width=6), keep=torch.ones(T, dtype=torch.bool))
    with pytest.raises(ShapeError, match="keep"):
        layer(states(), attention_states=states(width=6), keep=torch.ones(1, 1, T, T))
    with pytest.raises(ShapeError, match="keep"):
        layer(states(), attention_states=states(width=6), keep=torch.ones(1, 1, T - 1, T, dtype=torch.bool))
    with pytest.raises(ConfigError, match="num_behaviours"):
        target_mask(0)
    with pytest.raises(ConfigError, match=r"^target_mask: num_behaviours must be an integer, got 2.5$"):
        target_mask(2.5)
