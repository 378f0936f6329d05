"""Each edit against its definition, written independently as plain loops/closed forms in float64."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.edits import EDITS, parse_edit_spec
from attnlab.functional.attention import attention_reference, causal_keep
from attnlab.probes.base import SequenceInfo
from edits.helpers import capture_probs, edited_call, qkv, sdpa_fn


def reference_probs(query, key):
    return attention_reference(query, key, key[..., :1].expand(*key.shape[:3], 1).contiguous(),
                               causal_keep(query.shape[2], key.shape[2])[None, None])[1]


def test_temperature_divides_logits_by_tau():
    query, key, value = qkv()
    call = edited_call([EDITS.get("temperature")(tau=0.5)], query, key, value)
    expected = reference_probs(query / 0.5, key)  # (q·k·scale)/τ
    torch.testing.assert_close(capture_probs(call), expected)


def test_temperature_log_n_factor_per_query_position():
    query, key, value = qkv(L=9)
    edit = EDITS.get("temperature")(tau=1.0, variant="log_n", train_len=4)
    call = edited_call([edit], query, key, value)
    factor = torch.tensor([max(1.0, math.log(p + 1) / math.log(4)) for p in range(9)], dtype=torch.float64)
    expected = reference_probs(query * factor[:, None], key)
    torch.testing.assert_close(capture_probs(call), expected)


def test_zerotuning_matches_the_closed_form():
    query, key, value = qkv()
    gamma = 2.5
    probs = reference_probs(query, key)
    a0 = probs[..., :1]
    denominator = (gamma - 1) * a0 + 1
    expected = probs / denominator
    expected[..., 0] = gamma * probs[..., 0] / denominator[..., 0]
    call = edited_call([EDITS.get("zerotuning")(gamma=gamma, heads=[1, 2])], query, key, value)
    got = capture_probs(call)
    torch.testing.assert_close(got[:, [1, 2]], expected[:, [1, 2]])
    torch.testing.assert_close(got[:, [0, 3]], probs[:, [0, 3]])  # other query heads of the same kv groups untouched


def act_loop(probs, beta, theta):
    """ACT on one (Lq = Lk) causal matrix per (batch, head), written as loops."""
    out = probs.clone()
    B, H, N, _ = probs.shape
    for b in range(B):
        for h in range(H):
            A = probs[b, h]
            scores = [sum(A[i, k] for i in range(k, N)) / (N - k) for k in range(N)]
            sinks = [k for k in range(1, N) if scores[k] > theta]
            for i in range(N):
                visible = range(i + 1)
                sink_mass = sum(A[i, k] for k in sinks if k <= i)
                rest = [j for j in visible if j not in sinks]
                rest_mass = sum(A[i, j] for j in rest)
                if rest_mass <= 0:
                    continue
                for k in sinks:
                    if k <= i:
                        out[b, h, i, k] = beta * A[i, k]
                for j in rest:
                    out[b, h, i, j] = A[i, j] + (1 - beta) * sink_mass * A[i, j] / rest_mass
    return out


def test_calibration_matches_act_loops():
    query, key, value = qkv(B=1, Hq=2, Hkv=1, L=8, D=4, seed=3)
    key[:, :, 3] *= 4  # give some head a hidden sink at key 3
    query = query * 3
    probs = reference_probs(query, key)
    call = edited_call([EDITS.get("calibration")(beta=0.4, theta=0.15)], query, key, value, block_size=3)
    expected = act_loop(probs, 0.4, 0.15)
    assert not torch.allclose(expected, probs), "the constructed case must contain a hidden sink"
    torch.testing.assert_close(capture_probs(call), expected)


def test_redistribution_moves_sink_mass_to_targets_in_proportion():
    query, key, value = qkv(B=1, Hq=2, Hkv=2, L=7, D=4, seed=5)
    probs = reference_probs(query, key)
    edit = EDITS.get("redistribution")(fraction=0.25, sink_positions=[0], target_start=3, target_end=6)
    got = capture_probs(edited_call([edit], query, key, value))
    expected = probs.clone()
    for h in range(2):
        for i in range(7):
            targets = [j for j in range(3, 6) if j <= i]
            total = sum(probs[0, h, i, j] for j in targets)
            if not targets or total <= 0:
                continue
            budget = 0.25 * probs[0, h, i, 0]
            expected[0, h, i, 0] = 0.75 * probs[0, h, i, 0]
            for j in targets:
                expected[0, h, i, j] = probs[0, h, i, j] + budget * probs[0, h, i, j] / total
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)))


def test_window_decay_scales_only_far_positive_logits():
    query, key, value = qkv(L=10)
    edit = EDITS.get("window_decay")(window=4, alpha=0.5)
    got = capture_probs(edited_call([edit], query, key, value))
    logits = (query @ key.repeat_interleave(2, dim=1).transpose(-1, -2)) * query.shape[-1] ** -0.5
    for i in range(10):
        for j in range(10):
            if abs(i - j) > 2 and logits[..., i, j].numel():
                logits[..., i, j] = torch.where(logits[..., i, j] > 0, 0.5 * logits[..., i, j], logits[..., i, j])
    logits = logits.masked_fill(~causal_keep(10, 10), float("-inf"))
    torch.testing.assert_close(got, torch.softmax(logits, dim=-1))


@pytest.mark.parametrize("spec", ["identity_blend:alpha=0.3", "first_key:alpha=1", "first_key:alpha=0.6,heads=3"])
def test_one_hot_blends(spec):
    query, key, value = qkv()
    edit = parse_edit_spec(spec)
    probs = reference_probs(query, key)
    got = capture_probs(edited_call([edit], query, key, value))
    onehot = torch.zeros_like(probs)
    if edit.name == "identity_blend":
        onehot[..., range(11), range(11)] = 1.0
    else:
        onehot[..., 0] = 1.0
    expected = (1 - edit.alpha) * probs + edit.alpha * onehot
    heads = list(edit.heads or range(4))
    torch.testing.assert_close(got[:, heads], expected[:, heads])
    other = [h for h in range(4) if h not in heads]
    torch.testing.assert_close(got[:, other], probs[:, other])


def test_sink_window_keeps_sinks_and_recent_keys_only():
    query, key, value = qkv(L=12)
    got = capture_probs(edited_call([EDITS.get("sink_window")(sinks=2, window=3)], query, key, value))
    for i in range(12):
        for j in range(12):
            allowed = j <= i and (j < 2 or i - j < 3)
            assert (got[..., i, j] > 0).all() if allowed else (got[..., i, j] == 0).all(), (i, j)


def test_concentric_positions_rings_and_mask():
    edit = EDITS.get("concentric_positions")(start=1, height=4, width=4)
    ids = torch.arange(20)[None]
    rings = [0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    expected = [0] + [1 + r for r in rings] + [1 + 2 + t for t in range(3)]
    assert edit.position_ids(ids, SequenceInfo.from_mask(torch.ones(1, 20, dtype=torch.bool), None, 0))[0].tolist() == expected
    query, key, value = qkv(B=1, L=20)
    got = capture_probs(edited_call([edit], query, key, value))
    for i in range(20):
        for j in range(20):
            if 1 <= i < 17 and 1 <= j < 17:
                allowed = rings[j - 1] <= rings[i - 1]
            else:
                allowed = j <= i
            assert (got[..., i, j] > 0).all() if allowed else (got[..., i, j] == 0).all(), (i, j)


@pytest.mark.parametrize("spec", ["temperature:tau=0.7", "temperature:tau=0.8,variant=log_n,train_len=3",
                                  "zerotuning:gamma=0.3,heads=0+3", "head_scale:scale=2,heads=1",
                                  "identity_blend:alpha=0.4", "first_key:alpha=1,heads=2",
                                  "sink_window:sinks=1,window=4", "mask:name=sliding_window,window=2",
                                  "concentric_positions:start=2,height=3,width=3"])
def test_fast_form_equals_eager_form(spec):
    query, key, value = qkv()
    call = edited_call([parse_edit_spec(spec)], query, key, value)
    assert call.is_fast()
    torch.testing.assert_close(call.fast(sdpa_fn(call.scale)), call.eager())


def test_head_selection_on_gqa_touches_only_that_query_head():
    query, key, value = qkv(Hq=4, Hkv=2)
    base = edited_call([EDITS.get("head_scale")(scale=1.0)], query, key, value).eager()
    out = edited_call([EDITS.get("head_scale")(scale=0.0, heads=[1])], query, key, value).eager()
    assert torch.equal(out[:, [0, 2, 3]], base[:, [0, 2, 3]])  # head 0 shares head 1's kv group: unchanged
    assert (out[:, 1] == 0).all()


def test_composition_follows_stage_order_not_list_order():
    query, key, value = qkv()
    temperature, window = EDITS.get("temperature")(tau=0.6), EDITS.get("sink_window")(sinks=1, window=3)
    a = edited_call([temperature, window], query, key, value).eager()
    b = edited_call([window, temperature], query, key, value).eager()
    torch.testing.assert_close(a, b)
    keep = causal_keep(11, 11) & ((torch.arange(11)[None] < 1) | (torch.arange(11)[:, None] - torch.arange(11)[None] < 3))
    expected = attention_reference(query / 0.6, key, value, keep[None, None])[0]
    torch.testing.assert_close(a, expected)
