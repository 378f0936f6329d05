"""visual_sinks: VAR's sink tokens (φ = |x / rms(x)| on the sink dims > τ) per layer and per image token, against a
plain loop; padding, two images in one sequence, given and found dims, the fallback input, merges, a tiny LLaVA."""

from __future__ import annotations

import re

import pytest
import torch
from vlm_fixtures import merged_rows

from attnlab.columns import SCHEMA_VERSION
from attnlab.errors import ConfigError
from attnlab.probes import PROBES
from attnlab.report.render import render_html
from attnlab.report.sections import section_specs
from attnlab.roles import IMAGE
from tests.probes.vlm_helpers import batch_roles, facts_for, make_call, tiny_llava, vlm_batch

LAYERS, HEADS, KV, D = 3, 4, 2, 1024  # φ ≤ √D: τ = 20 needs D > 400


def _hidden(seed, valid, roles):
    """(B, L, D) random residuals with massive values planted in dims 5 and 11 on a few image tokens and on each
    sequence's first real token (a BOS-like text sink), more of them in later layers."""
    generator = torch.Generator().manual_seed(seed)
    B, L = valid.shape
    hidden = torch.randn(B, L, D, generator=generator)
    for b in range(B):
        first = int(valid[b].nonzero()[0])
        hidden[b, first, 5] = 400.0
        image = (roles.codes[b] == IMAGE).nonzero().flatten()
        chosen = image[torch.randperm(len(image), generator=generator)[: 2 + seed % 3]]
        hidden[b, chosen, 11] = -300.0
    hidden[~valid] = 1e4  # padding garbage must never count
    return hidden


def _oracle(hiddens, roles, valid, dims=None, top=2, tau=20.0):
    """Per layer: image/text sink counts and tokens, and per image (sequence, index) the per-layer flags."""
    out = {"image_sinks": [], "image_tokens": [], "text_sinks": [], "text_tokens": [], "dims": [], "flags": {}}
    B, L = valid.shape
    for layer, hidden in enumerate(hiddens):
        counts = [0, 0, 0, 0]
        for b in range(B):
            real = [i for i in range(L) if valid[b, i]]
            x = hidden[b].double()
            phi = [(x[i].abs() / ((x[i] ** 2).mean() + 1e-6).sqrt()).tolist() for i in range(L)]  # per token
            peaks = [max(phi[i][d] for i in real) for d in range(len(phi[0]))]
            chosen = dims if dims is not None else sorted(range(len(peaks)), key=lambda d: -peaks[d])[:top]
            out["dims"].append(sorted(chosen))
            sink = [i in real and max(phi[i][d] for d in chosen) > tau for i in range(L)]
            for i in real:
                is_image = int(roles.codes[b, i]) == IMAGE
                counts[0 if is_image else 2] += sink[i]
                counts[1 if is_image else 3] += 1
            for span in roles.spans(b):
                out["flags"].setdefault((b, span.index), []).append(sink[span.start:span.end])
        for key, value in zip(("image_sinks", "image_tokens", "text_sinks", "text_tokens"), counts):
            out[key].append(value)
    return out


def _setup():
    batch = vlm_batch(1)
    roles, valid = batch_roles(batch), batch["attention_mask"].bool()
    return roles, valid, [_hidden(layer, valid, roles) for layer in range(LAYERS)]


def _probe(**kwargs):
    probe = PROBES.get("visual_sinks")(**kwargs)
    probe.bind(facts_for(LAYERS, HEADS, KV, hidden=D))
    return probe


def _feed(probe, roles, valid, hiddens, offset=0, through_outputs=False):
    for layer, hidden in enumerate(hiddens):
        if through_outputs and layer > 0:
            probe.on_hidden_states(layer - 1, hidden, None)
        call = make_call(layer, roles, valid, HEADS, KV, offset=offset, hidden=None if through_outputs else hidden)
        probe.begin_call(call)
        probe.end_call(call)


def _by_layer(rows, statistic):
    return {r["layer"]: r["value"] for r in rows if r["statistic"] == statistic}


@pytest.mark.parametrize("kwargs", [pytest.param({}, id="found-dims"), pytest.param({"dims": (5, 11)}, id="dims"),
                                    pytest.param({"dims": (11,), "tau": 25.0}, id="one-dim")])
def test_matches_a_plain_loop_under_padding_and_two_images(kwargs):
    roles, valid, hiddens = _setup()
    probe = _probe(**kwargs)
    _feed(probe, roles, valid, hiddens)
    expected = _oracle(hiddens, roles, valid, dims=kwargs.get("dims"), tau=kwargs.get("tau", 20.0))
    assert sum(expected["image_sinks"]) > 0  # the planted sinks are found
    assert (sum(expected["text_sinks"]) > 0) == (5 in kwargs.get("dims", (5,)))
    assert sum(expected["image_sinks"]) < sum(expected["image_tokens"])
    rows = probe.rows()
    assert _by_layer(rows, "image_sink_fraction") == pytest.approx(
        {layer: s / t for layer, (s, t) in enumerate(zip(expected["image_sinks"], expected["image_tokens"]))})
    assert _by_layer(rows, "text_sinks_per_sequence") == pytest.approx(
        {layer: s / 2 for layer, s in enumerate(expected["text_sinks"])})
    assert _by_layer(rows, "image_sinks_per_image") == pytest.approx(
        {layer: s / 3 for layer, s in enumerate(expected["image_sinks"])})
    grids = {(g["sequence"], g["image_index"]): g for g in probe.sink_grids()}
    assert set(grids) == set(expected["flags"]) == {(0, 0), (0, 1), (1, 0)}
    for key, per_layer in expected["flags"].items():
        share = torch.tensor(per_layer, dtype=torch.float64).mean(dim=0).reshape(4, 4)
        torch.testing.assert_close(torch.tensor(grids[key]["grid"], dtype=torch.float64), share, atol=1e-6, rtol=0)
        listed = {(layer, r * 4 + c) for layer, cells in grids[key]["layers"] for r, c in cells}
        assert listed == {(layer, t) for layer, flags in enumerate(per_layer) for t, f in enumerate(flags) if f}
    if "dims" not in kwargs:
        assert probe.dims_used() == [5, 11] or probe.dims_used() == [11, 5]
        assert all(dims == [5, 11] for dims in expected["dims"])
        assert _by_layer([r for r in rows if r["position"] == 5], "sink_dim_rate") == {0: 1.0, 1: 1.0, 2: 1.0}
    else:
        assert "sink_dim_rate" not in {r["statistic"] for r in rows}


def test_previous_layer_output_stands_in_for_the_input():
    roles, valid, hiddens = _setup()
    direct, fallback = _probe(), _probe()
    _feed(direct, roles, valid, hiddens)
    _feed(fallback, roles, valid, hiddens, through_outputs=True)
    assert fallback.sequences[0] == 0 and torch.equal(fallback.sequences[1:], direct.sequences[1:])
    for name in ("image_sinks", "text_sinks", "image_tokens"):
        assert torch.equal(getattr(fallback, name)[1:], getattr(direct, name)[1:])


def test_split_batches_merge_and_export_round_trip():
    roles, valid, hiddens = _setup()
    whole = _probe()
    _feed(whole, roles, valid, hiddens)
    merged = merged_rows(_probe, _feed, roles, valid, hiddens)
    for key, tensor in whole.state().items():
        torch.testing.assert_close(merged.state()[key], tensor)
    assert merged.sink_grids() == whole.sink_grids()


def test_decode_calls_reuse_the_prompt_dims_and_count_no_sequence():
    # the decode token's own largest dim (20) is not a prompt D_sink: judged on the prompt's dims (5, 11) it is no
    # sink, though alone it would be (its φ on dim 20 is ≈ √D); a token with 400 on dim 5 is one
    from attnlab.probes.base import AttentionCall, SequenceInfo

    roles, valid, hiddens = _setup()
    probe = _probe()
    _feed(probe, roles, valid, hiddens)
    before = {name: getattr(probe, name).clone() for name in ("sequences", "text_sinks", "text_tokens", "dim_count")}
    B, L = valid.shape
    step_roles, step_valid = roles.extend_generated(1), torch.cat([valid, torch.ones(B, 1, dtype=torch.bool)], 1)
    new = torch.randn(B, 1, D, generator=torch.Generator().manual_seed(9))
    new[0, 0, 20] = 400.0
    new[1, 0, 5] = 400.0
    sequence = SequenceInfo.from_mask(step_valid, None, 2, roles=step_roles)
    for layer in range(LAYERS):
        call = AttentionCall(layer_idx=layer, num_heads=HEADS, num_kv_heads=KV, q_len=1, kv_len=L + 1, causal=True,
                             scale=8 ** -0.5, value=torch.zeros(B, KV, L + 1, 8), query_valid=step_valid[:, -1:],
                             key_valid=step_valid, query_positions=sequence.positions[:, -1:],
                             key_positions=sequence.positions, sequence=sequence,
                             query_roles=step_roles.codes[:, -1:], key_roles=step_roles.codes, hidden_states=new)
        probe.begin_call(call)
        probe.end_call(call)
    assert torch.equal(probe.sequences, before["sequences"]) and torch.equal(probe.dim_count, before["dim_count"])
    assert torch.equal(probe.text_tokens, before["text_tokens"] + 2)
    assert torch.equal(probe.text_sinks, before["text_sinks"] + 1)  # sequence 1's token only


def test_bad_dims_are_config_errors():
    with pytest.raises(ConfigError, match="hidden size"):
        _probe(dims=(5, D))
    with pytest.raises(ConfigError):
        PROBES.get("visual_sinks")(tau=0.0)


def test_tiny_llava_in_a_session_matches_the_layer_inputs():
    """Through a Session: the sinks equal those computed from transformers' hidden_states (the input of each
    decoder layer), with left padding and two images in one sequence."""
    from attnlab.capture.session import Session

    model = tiny_llava(layers=LAYERS, heads=HEADS, kv_heads=KV)
    batch = vlm_batch(2)
    roles, valid = batch_roles(batch), batch["attention_mask"].bool()
    with torch.no_grad():
        inputs = model(**batch, output_hidden_states=True).hidden_states[:LAYERS]  # input of layer l
    tau = 2.5  # random weights have no massive activations: a low τ flags some tokens
    expected = _oracle(inputs, roles, valid, tau=tau)
    probe = PROBES.get("visual_sinks")(tau=tau)
    with Session(model, probes=[probe]), torch.no_grad():
        model(**batch)
    # Layer 0's input reaches the probe only when the Session fills call.hidden_states for probes; the later
    # layers' inputs are also the previous layers' outputs (on_hidden_states), so they are always there.
    first = 0 if probe.sequences[0] > 0 else 1
    assert probe.sequences[first:].tolist() == [2.0] * (LAYERS - first)
    assert probe.image_sinks[first:].tolist() == expected["image_sinks"][first:]
    assert probe.text_sinks[first:].tolist() == expected["text_sinks"][first:]
    assert sum(expected["image_sinks"][first:]) > 0 and sum(expected["text_sinks"][first:]) > 0
    assert probe.image_tokens[first:].tolist() == [48.0] * (LAYERS - first)
    assert probe.images[first:].tolist() == [3.0] * (LAYERS - first)
    grids = {(g["sequence"], g["image_index"]): g for g in probe.sink_grids()}
    for key, per_layer in expected["flags"].items():
        share = torch.tensor(per_layer[first:], dtype=torch.float64).mean(dim=0).reshape(4, 4)
        torch.testing.assert_close(torch.tensor(grids[key]["grid"], dtype=torch.float64), share, atol=1e-6, rtol=0)


def test_report_draws_the_section_with_the_overlay(tmp_path):
    from PIL import Image

    roles, valid, hiddens = _setup()
    probe = _probe(dims=(5, 11))
    _feed(probe, roles, valid, hiddens)
    Image.new("RGB", (32, 32), (120, 120, 120)).save(tmp_path / "a.png")
    image = {"path": str(tmp_path / "a.png"), "sha256": "", "width": 32, "height": 32}
    inputs = [{"sequence": 0, "images": [image, image]}, {"sequence": 1, "images": [image]}]
    results = {"schema_version": SCHEMA_VERSION, "command": "probe", "model": {"name": "tiny", "num_layers": LAYERS},
               "rows": probe.rows(), "extras": {probe.name: probe.extras()}, "sections": section_specs([probe]),
               "inputs": inputs}
    section = re.search(r'<section id="visual-sinks">(.*?)</section>', render_html(results), re.S).group(1)
    assert "τ = 20" in section and "5, 11" in section
    assert section.count("<img") == 3  # two layer curves and the overlay


def test_a_tau_above_root_d_is_named(caplog):
    """φ ≤ √D, so τ ≥ √D flags nothing: a logged warning and a note in the section; none when τ can be exceeded."""
    small = PROBES.get("visual_sinks")(tau=20.0)
    with caplog.at_level("WARNING", logger="attnlab.probes.visual_sinks"):
        small.bind(facts_for(LAYERS, HEADS, KV, hidden=32))
    assert any("cannot be exceeded" in r.message and "5.7" in r.message for r in caplog.records)
    assert "visual_sinks.tau=" in small.extras()["tau_note"]
    results = {"schema_version": SCHEMA_VERSION, "command": "probe", "model": {"name": "tiny", "num_layers": LAYERS},
               "rows": small.rows(), "extras": {small.name: small.extras()}, "sections": section_specs([small])}
    assert "cannot be exceeded" in render_html(results)
    assert _probe(dims=(5, 11)).extras()["tau_note"] == ""  # D = 1024: √D = 32 > 20
