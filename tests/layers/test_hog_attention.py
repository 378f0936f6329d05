"""hog_attention: HOG-ranked groups by hand, a float64 loop oracle (outputs and gradients), the plain path, errors."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional import masks as M
from attnlab.layers import LAYERS
from attnlab.layers.hog_attention import HOGAttention, hog_group_ids, hog_keep, hog_key
from attnlab.testing import assert_close

C, H, G, T = 8, 4, 3, 7


def build(seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = HOGAttention(C, H, guidance_dim=G, rope_base=None, **kwargs).double()
    return layer


def inputs(seed=1, T=T, B=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64)
    guidance = torch.rand(B, T, G, generator=gen, dtype=torch.float64)  # distinct keys almost surely
    return x, guidance


# -- the grouping, by hand --------------------------------------------------------------------------------------------
def test_key_weights_bins_by_index_plus_one():
    guidance = torch.tensor([[[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, 0.0], [0.2, 0.3, 0.5]]])
    # 2; 0.5·1 + 0.5·3 = 2; 0 (flat patch); 0.2 + 0.6 + 1.5 = 2.3
    assert_close(hog_key(guidance), torch.tensor([[2.0, 2.0, 0.0, 2.3]]))


def test_groups_of_a_hand_sorted_sequence():
    key = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    # ascending order: t3, t1, t2, t0 -> ranks t0:3, t1:1, t2:2, t3:0
    assert hog_group_ids(key, 2, "box").tolist() == [[1, 0, 1, 0]]  # ranks // 2
    assert hog_group_ids(key, 2, "interleaved").tolist() == [[1, 1, 0, 0]]  # ranks % 2


def test_ragged_groups_and_stable_ties():
    key = torch.tensor([[0.0, 5.0, 0.0, 1.0, 0.0]])
    # ties at 0 keep token order: ranks t0:0, t2:1, t4:2, t3:3, t1:4; box size ceil(5/2) = 3
    assert hog_group_ids(key, 2, "box").tolist() == [[0, 1, 0, 1, 0]]
    assert hog_group_ids(key, 2, "interleaved").tolist() == [[0, 0, 1, 1, 0]]


def test_keep_splits_box_and_interleaved_over_heads():
    guidance = torch.tensor([[[3.0], [1.0], [2.0], [0.0]]])  # G = 1: key = guidance
    keep = hog_keep(guidance, num_heads=3, num_groups=2)  # heads 0, 1 box (ceil(3/2) = 2); head 2 interleaved
    box = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    inter = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert keep.shape == (1, 3, 4, 4)
    assert torch.equal(keep[0, 0], box) and torch.equal(keep[0, 1], box) and torch.equal(keep[0, 2], inter)
    assert torch.equal(hog_keep(guidance, 3, 2, "interleaved")[0, 0], inter)
    assert hog_keep(guidance, 3, 1).all()  # one group: every pair


def test_group_mean_when_logits_are_zero():
    """q = k = 0 -> uniform attention inside each group; v and o identity -> each head averages its group."""
    layer = HOGAttention(4, 2, guidance_dim=1, num_groups=2, mask_mod=M.full(), rope_base=None).double()
    with torch.no_grad():
        layer.q_proj.weight.zero_()
        layer.k_proj.weight.zero_()
        layer.v_proj.weight.copy_(torch.eye(4))
        layer.o_proj.weight.copy_(torch.eye(4))
        layer.guide.weight.zero_()
    x = torch.arange(16, dtype=torch.float64).view(1, 4, 4)  # token t = [4t, 4t+1, 4t+2, 4t+3]
    guidance = torch.tensor([[[3.0], [1.0], [2.0], [0.0]]], dtype=torch.float64)
    out, state = layer(x, guidance=guidance)
    # head 0 (channels 0, 1) box groups {t0, t2}, {t1, t3}; head 1 (channels 2, 3) interleaved {t0, t1}, {t2, t3}
    expected = torch.tensor([[[4.0, 5.0, 4.0, 5.0],     # t0: mean(t0, t2) | mean(t0, t1)
                              [8.0, 9.0, 4.0, 5.0]]],  # t1: mean(t1, t3) | mean(t0, t1)
                            dtype=torch.float64)
    assert state is None
    assert_close(out[:, :2], expected)
    assert_close(out[0, 2], torch.tensor([4.0, 5.0, 12.0, 13.0], dtype=torch.float64))  # t2: (t0,t2) | (t2,t3)
    assert_close(out[0, 3], torch.tensor([8.0, 9.0, 12.0, 13.0], dtype=torch.float64))  # t3: (t1,t3) | (t2,t3)


# -- against a float64 plain-loop oracle ------------------------------------------------------------------------------
def oracle(layer, x, guidance, causal):
    """Independent float64 loop: groups from a Python sort, softmax over each query's allowed keys; query head h
    reads kv head g = h // (H / Hkv)."""
    W = {name: p for name, p in layer.named_parameters()}
    B, T, _ = x.shape
    D, per_kv = layer.head_dim, H // layer.num_kv_heads
    inp = x + guidance @ W["guide.weight"].T
    q, k, v = inp @ W["q_proj.weight"].T, inp @ W["k_proj.weight"].T, inp @ W["v_proj.weight"].T
    n_box = math.ceil(H / 2)
    size = math.ceil(T / layer.num_groups)
    rows = []
    for b in range(B):
        keys = [sum((g + 1) * float(guidance[b, t, g].detach()) for g in range(G)) for t in range(T)]
        order = sorted(range(T), key=lambda t: (keys[t], t))
        rank = {t: r for r, t in enumerate(order)}
        tokens = []
        for i in range(T):
            heads = []
            for h in range(H):
                group = (lambda t: rank[t] // size) if h < n_box else (lambda t: rank[t] % layer.num_groups)
                js = [j for j in range(T) if group(j) == group(i) and (not causal or j <= i)]
                cols, kv_cols = slice(h * D, (h + 1) * D), slice(h // per_kv * D, (h // per_kv + 1) * D)
                logits = torch.stack([q[b, i, cols] @ k[b, j, kv_cols] for j in js]) / math.sqrt(D)
                probs = torch.softmax(logits, dim=0)
                heads.append(sum(p * v[b, j, kv_cols] for p, j in zip(probs, js)))
            tokens.append(torch.cat(heads))
        rows.append(torch.stack(tokens))
    return torch.stack(rows) @ W["o_proj.weight"].T


@pytest.mark.parametrize(("causal", "num_groups", "kv_heads"), [
    (True, 2, None), (True, 3, None), (False, 2, None), (False, 3, None), (False, 3, 2), (True, 2, 1)],
    ids=["causal-groups2", "causal-groups3", "full-groups2", "full-groups3", "full-groups3-gqa", "causal-groups2-mqa"])
def test_matches_loop_oracle_outputs_and_gradients(causal, num_groups, kv_heads):
    layer = build(num_groups=num_groups, mask_mod=None if causal else M.full(), num_kv_heads=kv_heads)
    x, guidance = inputs()
    x.requires_grad_(True)
    guidance.requires_grad_(True)
    out = layer(x, guidance=guidance)[0]
    cotangent = torch.randn_like(out)
    got = torch.autograd.grad((out * cotangent).sum(), [x, guidance, *layer.parameters()])
    want_out = oracle(layer, x, guidance, causal)
    want = torch.autograd.grad((want_out * cotangent).sum(), [x, guidance, *layer.parameters()])
    assert_close(out, want_out)
    for a, b in zip(got, want):
        assert_close(a, b)


def test_float32_matches_the_float64_oracle():
    layer = build(num_groups=2)
    x, guidance = inputs()
    want = oracle(layer, x, guidance, causal=True)
    out = layer.float()(x.float(), guidance=guidance.float())[0]
    assert_close(out, want.float(), dtype=torch.float32)


# -- the plain path and the mask ------------------------------------------------------------------------------------
def _masked_twin(layer):
    twin = LAYERS.get("masked")(C, H, rope_base=layer.rope_base, mask_mod=layer.mask_mod).double()
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("guide.")}
    twin.load_state_dict(state)
    return twin


def test_without_guidance_it_is_masked_attention():
    layer = build()
    layer.rope_base = 10000.0  # RoPE as a TinyLM mixer
    x, _ = inputs()
    assert_close(layer(x)[0], _masked_twin(layer)(x)[0])


def test_one_group_keeps_the_guidance_input_only():
    layer = build(num_groups=1)
    x, guidance = inputs()
    shifted = x + layer.guide(guidance)
    assert_close(layer(x, guidance=guidance)[0], _masked_twin(layer)(shifted)[0])


def test_causal_output_ignores_later_hidden_states():
    """Only hidden states: under a causal mask the layer is NOT causal-safe in its guidance (next test)."""
    layer = build(num_groups=2)
    x, guidance = inputs()
    changed = x.clone()
    changed[:, 4:] += 1.0
    a, b = layer(x, guidance=guidance)[0], layer(changed, guidance=guidance)[0]
    assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_causal_mask_with_guidance_reads_later_guidance():
    """The documented look-ahead: the HOG ranking uses the whole call's guidance, so changing only later tokens'
    guidance (and the hidden states not at all) regroups, and changes, earlier outputs under a causal mask."""
    layer = build(num_groups=2)
    x, guidance = inputs()
    changed = guidance.clone()
    changed[:, 4:] = changed[:, 4:].flip(-1) * 3.0  # later keys move across the earlier tokens' ranks
    assert not torch.equal(hog_keep(guidance, H, 2)[:, :, :4, :4], hog_keep(changed, H, 2)[:, :, :4, :4])
    a, b = layer(x, guidance=guidance)[0], layer(x, guidance=changed)[0]
    assert not torch.allclose(a[:, :4], b[:, :4])


def test_the_host_hook_receives_the_group_mask():
    layer = build(num_groups=2)
    x, guidance = inputs()
    seen = []

    class Hook:
        def softmax(self, q, k, v, keep, scale):
            seen.append(keep)
            logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
            return torch.softmax(logits, dim=-1) @ v

    own = layer(x, guidance=guidance)[0]
    layer.attention_hook = Hook()
    hooked = layer(x, guidance=guidance)[0]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.equal(seen[0], hog_keep(guidance, H, 2) & causal)
    assert_close(hooked, own)


def test_gradients_reach_every_parameter_with_guidance():
    layer = build()
    x, guidance = inputs()
    layer(x, guidance=guidance)[0].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


# -- bad input --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(guidance_dim=0), r"guidance_dim must be in \[1, inf\), got 0"), (dict(num_groups=0), "num_groups"),
    (dict(num_groups=2.5), r"^hog_attention: num_groups must be an integer, got 2.5$"),
    (dict(guidance_dim=2.5), "guidance_dim must be an integer"), (dict(grouping="rows"), "grouping")])
def test_bad_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HOGAttention(C, H, **kwargs)


@pytest.mark.parametrize("guidance", [torch.zeros(2, T, G + 1), torch.zeros(2, T - 1, G), torch.zeros(T, G),
                                      torch.zeros(2, T, G, dtype=torch.long)],
                         ids=["wrong_bins", "wrong_length", "no_batch", "integer"])
def test_bad_guidance(guidance):
    layer = build()
    x, _ = inputs()
    with pytest.raises(ShapeError, match="expected guidance"):
        layer(x, guidance=guidance if guidance.dtype == torch.long else guidance.double())


def test_a_state_is_refused():
    layer = build()
    x, guidance = inputs()
    with pytest.raises(ConfigError, match="state=None"):
        layer(x, state=torch.zeros(1), guidance=guidance)


def test_dense_and_flex_paths_agree():
    dense = build(num_groups=2)
    flex = build(num_groups=2, path="flex")
    x, guidance = inputs()
    with torch.no_grad():
        assert_close(flex.float()(x.float(), guidance=guidance.float())[0],
                     dense.float()(x.float(), guidance=guidance.float())[0], dtype=torch.float32)
