"""object_attention (OAT, Fang et al. 2024): the object encodings, the relation term in the logits, masks, the
hook, and bad inputs, against hand-worked cases and a float64 plain-loop oracle."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.masks import full
from attnlab.layers import LAYERS
from attnlab.layers.object_attention import box_centres, object_encoding, relation, sinusoidal_encoding
from attnlab.testing import assert_close

C, H = 8, 2
f64 = torch.float64


def layer(**kwargs):
    torch.manual_seed(0)
    out = LAYERS.get("object_attention")(C, H, **{"rope_base": None, **kwargs}).double()
    with torch.no_grad():
        out.gain.copy_(torch.tensor([1.5, -0.7], dtype=f64))
    return out


# -- encodings -----------------------------------------------------------------------------------------------------
def test_box_centres_hand_case():
    boxes = torch.tensor([[[0.0, 0.2, 0.4, 0.6], [0.5, 0.5, 0.7, 0.9]]])
    assert torch.equal(box_centres(boxes), torch.tensor([[[0.2, 0.4], [0.6, 0.7]]]))
    centres = torch.rand(1, 2, 2)
    assert box_centres(centres) is centres


@pytest.mark.parametrize(("sigma", "bound"), [(0.1, 1e-2), (0.15, 2e-4)], ids=["defaults", "sigma-0.15"])
def test_object_encoding_cosine_is_a_gaussian_of_the_distance(sigma, bound):
    """OAT's property at the documented per-axis bounds (16 anchors per axis, encoding_dim=32): cosine =
    mean over axes of exp(-Δ²/(2σ²)) (independent closed form), unit norm. With |Δy| = |Δx| the mean of the two
    axes is the per-axis cosine itself, so its error is the per-axis error; 201 centres over [0, 1]."""
    xs = torch.linspace(0, 1, 201, dtype=f64)
    centres = torch.stack([xs, xs.flip(0)], dim=-1)[None]  # (1, 201, 2)
    encoded = object_encoding(centres, sigma=sigma, encoding_dim=32)
    assert_close(encoded.norm(dim=-1), torch.ones(1, 201, dtype=f64))
    dx = xs[:, None] - xs[None, :]
    error = (relation(encoded)[0] - torch.exp(-dx ** 2 / (2 * sigma ** 2))).abs().max()
    assert bound / 10 < error < bound  # the bound holds and is not loose by an order of magnitude


def test_object_encoding_relation_falls_monotonically_and_sinusoidal_does_not():
    xs = torch.linspace(0, 1, 41, dtype=f64)
    centres = torch.stack([xs, torch.full_like(xs, 0.5)], dim=-1)[None]
    obj = relation(object_encoding(centres))[0, 0]  # relation of x = 0 with x = 0 … 1
    sin = relation(sinusoidal_encoding(centres))[0, 0]
    assert bool((obj[1:] <= obj[:-1] + 1e-12).all()) and obj[-1] < 0.5 + 1e-6  # x-axis term reaches 0
    assert not bool((sin[1:] <= sin[:-1] + 1e-12).all())  # rises again somewhere


def test_sinusoidal_encoding_cosine_is_the_mean_of_cosines():
    """⟨e_i, e_j⟩ = ½ Σ_axes mean_k cos(ω_k s Δ) with ω_k = 10000^(-2k/n) (by hand, n = 8: k = 0 … 3)."""
    a = torch.tensor([[[0.1, 0.3], [0.7, 0.2]]], dtype=f64)
    got = relation(sinusoidal_encoding(a, encoding_dim=16, scale=10.0))[0, 0, 1]
    freqs = [10000 ** (-2 * k / 8) for k in range(4)]
    want = 0.5 * (sum(math.cos(w * 10 * 0.6) for w in freqs) / 4 + sum(math.cos(w * 10 * 0.1) for w in freqs) / 4)
    assert abs(got.item() - want) < 1e-12


def test_nan_rows_are_unplaced():
    centres = torch.tensor([[[0.2, 0.2], [float("nan"), float("nan")], [0.4, 0.9]]])
    for encode in (object_encoding, sinusoidal_encoding):
        encoded = encode(centres)
        assert torch.isfinite(encoded).all() and torch.equal(encoded[0, 1], torch.zeros(32))
        assert relation(encoded)[0, 1].abs().max() == 0


# -- the layer against a plain-loop oracle -------------------------------------------------------------------------
def oracle(attention, hidden, boxes, keep, causal):
    """float64 loops: q/k/v from the weights, encodings from their definition, softmax per row, o_proj. Query head
    h reads kv head g = h // (H / Hkv)."""
    B, T, _ = hidden.shape
    D, groups = C // H, H // attention.num_kv_heads
    q = hidden @ attention.q_proj.weight.T
    k = hidden @ attention.k_proj.weight.T
    v = hidden @ attention.v_proj.weight.T
    sigma, n = attention.sigma, attention.encoding_dim // 2
    anchors = [-2 * sigma + (1 + 4 * sigma) * a / (n - 1) for a in range(n)]

    def encode(b, i):
        cx, cy = (boxes[b, i, 0] + boxes[b, i, 2]) / 2, (boxes[b, i, 1] + boxes[b, i, 3]) / 2
        parts = []
        for x in (cx, cy):
            feats = [torch.exp(-(x - m) ** 2 / sigma ** 2) for m in anchors]
            norm = torch.sqrt(sum(f * f for f in feats))
            parts += [f / norm / math.sqrt(2) for f in feats]
        return parts

    out = torch.zeros(B, T, C, dtype=f64)
    for b in range(B):
        codes = [encode(b, i) for i in range(T)] if boxes is not None else None
        for h in range(H):
            g = h // groups
            for i in range(T):
                logits, values = [], []
                for j in range(T):
                    if (causal and j > i) or (keep is not None and not keep[b, i, j]):
                        continue
                    s = sum(q[b, i, h * D + d] * k[b, j, g * D + d] for d in range(D)) / math.sqrt(D)
                    if codes is not None:
                        s = s + attention.gain[h] * sum(x * y for x, y in zip(codes[i], codes[j], strict=True))
                    logits.append(s)
                    values.append(v[b, j, g * D:(g + 1) * D])
                weights = torch.softmax(torch.stack(logits), dim=0)
                out[b, i, h * D:(h + 1) * D] = sum(w * val for w, val in zip(weights, values, strict=True))
    return out @ attention.o_proj.weight.T


@pytest.mark.parametrize(("causal", "with_keep", "with_boxes", "kv_heads"), [
    (True, False, True, None), (False, False, True, None), (False, True, True, None), (True, True, False, None),
    (False, True, True, 1)],
    ids=["causal-boxes", "full-boxes", "full-keep-boxes", "causal-keep-plain", "full-keep-boxes-mqa"])
def test_output_and_gradients_match_the_loop_oracle(causal, with_keep, with_boxes, kv_heads):
    attention = layer(mask_mod=None if causal else full(), num_kv_heads=kv_heads)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, C, generator=gen, dtype=f64, requires_grad=True)
    corner = torch.rand(2, 5, 2, generator=gen, dtype=f64) * 0.8
    size = 0.2 * torch.rand(2, 5, 2, generator=gen, dtype=f64)
    boxes = torch.cat([corner, corner + size], dim=-1) if with_boxes else None
    keep = torch.rand(2, 5, 5, generator=gen) > 0.4 if with_keep else None
    if keep is not None:
        keep |= torch.eye(5, dtype=torch.bool)  # every row sees a key
    got = attention(hidden, boxes=boxes, keep=keep)[0]
    want = oracle(attention, hidden, boxes, keep, causal)
    assert_close(got, want)
    cotangent = torch.randn(got.shape, generator=gen, dtype=f64)
    params = [hidden, attention.q_proj.weight] + ([attention.gain] if with_boxes else [])
    grads = torch.autograd.grad((got * cotangent).sum(), params)
    want_grads = torch.autograd.grad((want * cotangent).sum(), params)
    for g, w in zip(grads, want_grads, strict=True):
        assert_close(g, w)
    if with_boxes:
        assert grads[-1].abs().min() > 0  # the gain learns


@pytest.mark.parametrize("length", [7, 130])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dense_and_flex_paths_agree(length, causal):
    """Eager Flex (CPU) against SDPA with the relation score_mod and a per-call keep, at lengths that are not a
    multiple of the block size."""
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(2, length, C, generator=gen)
    boxes = torch.rand(2, length, 2, generator=gen)
    keep = (torch.rand(2, length, length, generator=gen) > 0.3) | torch.eye(length, dtype=torch.bool)
    mask_mod = None if causal else full()
    dense, flex = layer(mask_mod=mask_mod).float(), layer(mask_mod=mask_mod, path="flex").float()
    with torch.no_grad():
        assert_close(flex(hidden, boxes=boxes, keep=keep)[0], dense(hidden, boxes=boxes, keep=keep)[0],
                     dtype=torch.float32)


def test_hand_case_relation_only():
    """q_proj = 0, so logits = gain · ⟨e_i, e_j⟩: two objects at one place and an unplaced token.
    gain = ln 2: query 0 sees logits [ln 2, ln 2, 0] → probs [2/5, 2/5, 1/5]; the unplaced token sees [0, 0, 0]."""
    attention = LAYERS.get("object_attention")(2, 1, mask_mod=full(), rope_base=None).double()
    with torch.no_grad():
        attention.q_proj.weight.zero_()
        attention.v_proj.weight.copy_(torch.eye(2))
        attention.o_proj.weight.copy_(torch.eye(2))
        attention.gain.fill_(math.log(2))
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]], dtype=f64)
    nan = float("nan")
    centres = torch.tensor([[[0.3, 0.6], [0.3, 0.6], [nan, nan]]], dtype=f64)
    out = attention(hidden, boxes=centres)[0]
    want = torch.tensor([[[2 / 5 + 1, 2 / 5 + 1], [2 / 5 + 1, 2 / 5 + 1], [2, 2]]], dtype=f64)
    assert_close(out, want)


def test_without_boxes_it_is_masked_attention():
    attention = layer(rope_base=10000.0)
    masked = LAYERS.get("masked")(C, H).double()
    masked.load_state_dict({k: v for k, v in attention.state_dict().items() if k != "gain"})
    hidden = torch.randn(2, 6, C, dtype=f64, generator=torch.Generator().manual_seed(0))
    assert_close(attention(hidden)[0], masked(hidden)[0])


def test_sinusoidal_encoding_changes_only_the_relation():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, C, generator=gen, dtype=f64)
    boxes = torch.rand(1, 4, 2, generator=gen, dtype=f64)
    a, b = layer(), layer(encoding="sinusoidal")
    assert_close(a(hidden)[0], b(hidden)[0])
    assert not torch.allclose(a(hidden, boxes=boxes)[0], b(hidden, boxes=boxes)[0])
    want = relation(sinusoidal_encoding(boxes))
    assert_close(b.relation_bias(boxes)[:, 1], -0.7 * want)


# -- host hook and recorded probs ----------------------------------------------------------------------------------
class RecordingHook:
    def __init__(self):
        self.maps = []

    wants_maps = True

    def implied(self, attention_map):
        self.maps.append(attention_map)

    def softmax(self, *args):
        raise AssertionError("a relation score_mod must not go through hook.softmax")


def test_hook_sees_the_implied_map_and_record_probs_match_it():
    attention = layer(mask_mod=full())
    attention.record_probs = True
    hidden = torch.randn(2, 5, C, dtype=f64, generator=torch.Generator().manual_seed(4))
    boxes = torch.rand(2, 5, 4, dtype=f64, generator=torch.Generator().manual_seed(5))
    keep = torch.ones(2, 5, 5, dtype=torch.bool).tril()
    own = attention(hidden, boxes=boxes, keep=keep)[0]
    attention.attention_hook = hook = RecordingHook()
    hooked = attention(hidden, boxes=boxes, keep=keep)[0]
    assert_close(hooked, own)  # the hook does not change the output
    (m,) = hook.maps
    probs = torch.cat([block.probs for block in m.blocks(2)], dim=2)
    assert_close(probs, attention.last_probs.double(), dtype=torch.float32)
    assert bool((attention.last_probs.triu(1) == 0).all())  # the keep mask applies


def test_keep_forms_follow_the_per_call_convention():
    """(B, T, T) is one mask per sequence; (T, T) and a 4-D (B, 1, T, T) form mean the same mask."""
    attention = layer(mask_mod=full())
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 5, C, generator=gen, dtype=f64)
    boxes = torch.rand(2, 5, 2, generator=gen, dtype=f64)
    keep = (torch.rand(2, 5, 5, generator=gen) > 0.5) | torch.eye(5, dtype=torch.bool)
    out = attention(hidden, boxes=boxes, keep=keep)[0]
    for b in range(2):
        assert_close(out[b:b + 1], attention(hidden[b:b + 1], boxes=boxes[b:b + 1], keep=keep[b])[0])
    assert_close(attention(hidden, boxes=boxes, keep=keep[:, None])[0], out)
    assert not torch.allclose(attention(hidden, boxes=boxes, keep=keep.flip(0))[0], out)


def test_recorded_probs_of_a_row_that_sees_no_key_are_zero_not_nan():
    attention = layer(mask_mod=full())
    attention.record_probs = True
    keep = torch.ones(1, 4, 4, dtype=torch.bool)
    keep[0, 2] = False  # query 2 sees nothing
    hidden = torch.randn(1, 4, C, dtype=f64, generator=torch.Generator().manual_seed(7))
    attention(hidden, boxes=torch.rand(1, 4, 2, dtype=f64), keep=keep)
    probs = attention.last_probs
    assert probs.dtype == torch.float32 and not probs.requires_grad
    assert torch.equal(probs[0, :, 2], torch.zeros(H, 4))
    assert_close(probs[0, :, [0, 1, 3]].sum(-1).double(), torch.ones(H, 3, dtype=f64), dtype=torch.float32)


# -- bad inputs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"encoding": "rope"}, "encoding"), ({"sigma": 0.0}, "sigma"), ({"encoding_dim": 6}, "multiple of 4"),
    ({"encoding_dim": 0}, r"encoding_dim must be in \[4, inf\), got 0"),
    ({"encoding_dim": 8.5}, r"^object_attention: encoding_dim must be an integer, got 8.5$"),
    ({"sigma": "wide"}, "sigma must be a number"), ({"sinusoid_scale": -1.0}, "sinusoid_scale")])
def test_bad_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LAYERS.get("object_attention")(C, H, **kwargs)


@pytest.mark.parametrize(("boxes", "keep"), [
    (torch.rand(2, 5, 3), None), (torch.rand(2, 4, 4), None), (torch.rand(5, 4), None),
    (None, torch.ones(2, 5, 4, dtype=torch.bool)), (None, torch.ones(2, 5, 5)),
    (None, torch.ones(3, 5, 5, dtype=torch.bool)), (None, torch.ones(2, 3, 5, 5, dtype=torch.bool))])
def test_bad_inputs(boxes, keep):
    attention = LAYERS.get("object_attention")(C, H)
    with pytest.raises(ShapeError):
        attention(torch.randn(2, 5, C), boxes=boxes, keep=keep)
