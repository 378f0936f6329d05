"""The refam probe and the suppress_keys edit on hand-built joint calls (text first, like Flux)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusion.maps_calls import blocks, call_record
from hypothesis import given
from hypothesis import strategies as st

from attnlab.edits import parse_edit_spec
from attnlab.errors import ConfigError
from attnlab.probes import PROBES
from attnlab.roles import IMAGE, TEXT

T, P = 4, 16
ROLES = torch.tensor([[TEXT] * T + [IMAGE] * P])


def _joint_probs() -> torch.Tensor:
    """(1, 2, 20, 20): each image query gives token 0 0.6 and its region's token 0.4 (tokens 1–3 by region)."""
    probs = torch.zeros(1, 2, T + P, T + P, dtype=torch.float64)
    probs[..., :T, :] = 1.0 / (T + P)  # text queries: uniform (not read)
    for p in range(P):
        row = T + p
        probs[..., row, 0] = 0.6
        probs[..., row, 1 + (p >= 5) + (p >= 10)] = 0.4
    return probs


def _run(probe, probs, layer=0, grid=(1, 4, 4)):
    call = call_record(ROLES, ROLES, layer=layer, kind="joint", grid=grid)
    probe.begin_call(call)
    for block in blocks(probs, 7):
        probe.update(call, block)
    probe.end_call(call)


def test_refam_probe_scores_the_sink_and_grounds_the_content_tokens():
    probe = PROBES.get("refam")(magnets=[3])
    probe.bind(SimpleNamespace(num_layers=2))
    _run(probe, _joint_probs())
    rows = {(r["statistic"], r["layer"], r["position"]): r["value"] for r in probe.rows()}
    assert [rows[("enrichment", 0, t)] for t in range(T)] == pytest.approx([2.4, 0.5, 0.5, 0.6])
    assert [rows[("coverage", 0, t)] for t in range(T)] == pytest.approx([1.0, 5 / 16, 5 / 16, 6 / 16])
    assert [rows[("gas", 0, t)] for t in range(T)] == [1.0, 0.0, 0.0, 0.0]
    assert not any(layer == 1 for _, layer, _ in rows)  # layer 1 saw no call
    grounding = probe.extras()["grounding"]
    assert grounding["gas_tokens"] == [0] and grounding["content_tokens"] == [1, 2]
    expected = [1.0] * 10 + [0.0] * 6  # tokens 1, 2 cover patches 0–9
    assert [v for plane in grounding["grounding"] for row in plane for v in row] == expected
    assert grounding["peak"] == [0, 0, 0]


@given(st.permutations(list(range(T))))
def test_permuting_text_tokens_permutes_their_scores(order):
    probs = _joint_probs()
    permuted = probs.clone()
    permuted[..., :T] = probs[..., order]  # key column t of the new call is old token order[t]
    scores = []
    for p in (probs, permuted):
        probe = PROBES.get("refam")()
        probe.bind(SimpleNamespace(num_layers=1))
        _run(probe, p)
        scores.append(probe.scores())
    for before, after in zip(scores[0], scores[1]):
        assert torch.equal(after[0], before[0][order])


def test_map_sequence_must_be_a_batch_row():
    probe = PROBES.get("refam")(map_sequence=3)
    probe.bind(SimpleNamespace(num_layers=1))
    with pytest.raises(ConfigError, match="map_sequence=3 but the call has batch 1"):
        _run(probe, _joint_probs())


def test_refam_states_merge_by_addition_across_steps():
    one, two = PROBES.get("refam")(), PROBES.get("refam")()
    for probe in (one, two):
        probe.bind(SimpleNamespace(num_layers=1))
        _run(probe, _joint_probs())
    one.merge(two)
    rows = {(r["statistic"], r["position"]): r["value"] for r in one.rows()}
    assert rows[("enrichment", 0)] == pytest.approx(2.4) and rows[("coverage", 1)] == pytest.approx(5 / 16)


def test_suppress_keys_removes_the_chosen_text_keys_only():
    edit = parse_edit_spec("suppress_keys:tokens=0+2")
    call = call_record(ROLES, ROLES, kind="joint")
    logits = torch.zeros(1, 2, 3, T + P)
    out = edit.logits_mod(logits, torch.arange(3), call)
    assert torch.isinf(out[..., [0, 2]]).all() and (out[..., [1, 3]] == 0).all() and (out[..., T:] == 0).all()
    soft = parse_edit_spec("suppress_keys:tokens=1,bias=-2.5").logits_mod(logits, torch.arange(3), call)
    assert (soft[..., 1] == -2.5).all() and (soft[..., [0, 2, 3]] == 0).all()
    heads = parse_edit_spec("suppress_keys:tokens=1,heads=1").logits_mod(logits, torch.arange(3), call)
    assert (heads[:, 0] == 0).all() and torch.isinf(heads[:, 1, :, 1]).all()


def test_suppress_keys_refuses_to_empty_a_row():
    text_only = torch.tensor([[TEXT] * 2])
    call = call_record(torch.tensor([[IMAGE] * 3]), text_only, kind="cross")
    with pytest.raises(ConfigError, match="removes every visible key"):
        parse_edit_spec("suppress_keys:tokens=0+1").logits_mod(torch.zeros(1, 2, 3, 2), torch.arange(3), call)
