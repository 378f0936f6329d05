"""Edits inside a model through the Session: identity, paths, padding, GQA, verification, errors."""

from __future__ import annotations

import pytest
import torch

from attnlab import Session
from attnlab.edits import EDITS, parse_edit_spec
from attnlab.errors import ConfigError, EditNotFiredError, RegistryError
from attnlab.testing import MODEL_LOGITS_ATOL
from tiny_models import tiny_llama

IDS = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_heads=4, num_kv_heads=2, layers=2)


def logits_with(model, edits=(), probes=(), ids=IDS, mask=None):
    with torch.no_grad(), Session(model, probes=probes, edits=edits) as session:
        out = model(input_ids=ids, attention_mask=mask).logits
    return out, session


def sdpa_logits(model, ids=IDS, mask=None):
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("spec", ["temperature:tau=1", "zerotuning:gamma=1", "head_scale:scale=1",
                                  "identity_blend:alpha=0", "first_key:alpha=0", "window_decay:window=4,alpha=1",
                                  "calibration:beta=1", "redistribution:fraction=0"])
def test_identity_runs_the_no_edit_path_and_is_bit_identical(model, spec):
    # identity edits (fast or eager forms alike) do not choose the path: transformers' own SDPA, counted as fired
    out, session = logits_with(model, [spec])
    assert set(session.attention_paths.values()) == {"sdpa"}
    assert torch.equal(out, sdpa_logits(model))
    report = session.edit_report()
    assert bool(report.identity[0]) and report.max_change[0] == 0.0 and report.calls_touched[0] == 2


@pytest.mark.parametrize("spec", ["temperature:tau=0.6,layers=1", "zerotuning:gamma=4,heads=0+3",
                                  "identity_blend:alpha=0.5", "first_key:alpha=1,heads=1",
                                  "sink_window:sinks=2,window=5", "head_scale:scale=0,heads=2"])
def test_fast_path_agrees_with_the_eager_path(model, spec):
    fast, fast_session = logits_with(model, [spec])
    eager, eager_session = logits_with(model, [spec], probes=["entropy"])
    assert set(fast_session.attention_paths.values()) == {"sdpa+edits"} or "layers" in spec
    assert "blocked_eager+edits" in set(eager_session.attention_paths.values())
    torch.testing.assert_close(fast, eager, atol=MODEL_LOGITS_ATOL, rtol=0)
    assert not torch.allclose(fast, sdpa_logits(model), atol=1e-4), "the edit must change the logits"
    assert fast_session.edit_report().max_change[0] > 0


@pytest.mark.parametrize("spec", ["first_key:alpha=1", "zerotuning:gamma=3", "sink_window:sinks=1,window=4",
                                  "calibration:beta=0.3,theta=0.05", "redistribution:fraction=0.5"])
def test_left_padding_gives_the_same_per_sequence_result(model, spec):
    short = IDS[1:, 6:]
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), short], dim=1)
    batch = torch.cat([IDS[:1], padded])
    mask = torch.ones_like(batch)
    mask[1, :6] = 0
    together, _ = logits_with(model, [spec], ids=batch, mask=mask)
    alone, _ = logits_with(model, [spec], ids=short)
    torch.testing.assert_close(together[1, 6:], alone[0], atol=1e-4, rtol=0)
    first, _ = logits_with(model, [spec], ids=IDS[:1])
    torch.testing.assert_close(together[0], first[0], atol=1e-4, rtol=0)


def test_head_scale_acts_on_one_query_head_of_a_gqa_group(model):
    captured = {}
    o_proj = model.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0].detach()))
    try:
        logits_with(model, ["head_scale:scale=1"])
        base = captured["x"].view(2, 20, 4, -1)
        logits_with(model, ["head_scale:scale=0,layers=0,heads=1"])
        edited = captured["x"].view(2, 20, 4, -1)
    finally:
        handle.remove()
    assert (edited[:, :, 1] == 0).all()
    assert torch.equal(edited[:, :, [0, 2, 3]], base[:, :, [0, 2, 3]])


def test_edits_compose_and_probes_see_edited_attention(model):
    _, plain = logits_with(model, probes=["entropy"])
    _, sharp = logits_with(model, ["temperature:tau=0.3", "sink_window:sinks=1,window=4"], probes=["entropy"])
    def mean_entropy(session):
        frame = session.results()
        return frame[(frame.statistic == "entropy") & frame["head"].notna()].value.mean()
    assert mean_entropy(sharp) < mean_entropy(plain)
    assert list(sharp.edit_report().edit) == ["temperature", "sink_window"]


def test_edit_that_never_fires_fails_the_session(model):
    with pytest.raises(EditNotFiredError, match="never fired: head_scale"):
        with Session(model, edits=["head_scale:scale=0"]):
            pass  # the model never ran


def test_an_edit_that_changes_nothing_is_warned_about(model, caplog):
    """sink_window with a window longer than the sequence fires on every call but is a no-op: say so."""
    with caplog.at_level("WARNING", logger="attnlab.capture.edit_log"):
        logits_with(model, edits=["sink_window:sinks=4,window=1000"])
    assert any("sink_window" in r.message and "changed no output" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="attnlab.capture.edit_log"):
        logits_with(model, edits=["sink_window:sinks=1,window=4", "temperature:tau=1"])  # a real change; an identity
    assert not [r for r in caplog.records if "changed no output" in r.message]


def test_bad_layers_and_heads_are_config_errors(model):
    with pytest.raises(ConfigError, match="has 2 layers"):
        Session(model, edits=["head_scale:scale=0,layers=5"])
    with pytest.raises(ConfigError, match="num_heads=4"):
        logits_with(model, ["head_scale:scale=0,heads=7"])


@pytest.mark.parametrize("spec, error, message", [
    ("temprature:tau=2", RegistryError, "Did you mean: temperature"),
    ("temperature:tau=0", ConfigError, "tau must be in"),
    ("temperature:t=2", ConfigError, "takes: tau, variant, train_len"),
    ("sink_window:sinks=4;window=3", ConfigError, "window"),
    ("identity_blend:alpha=1.5", ConfigError, r"alpha must be in \[0.0, 1.0\]"),
    ("head_scale:layers=3-1", ConfigError, "empty"),
    ("calibration:threshold=bogus", ConfigError, "absolute"),
    ("mask:name=sliding_window,size=3", ConfigError, "does not take"),
    ("", ConfigError, "NAME:key=value"),
])
def test_bad_specs_give_one_line_errors(spec, error, message):
    with pytest.raises(error, match=message) as info:
        parse_edit_spec(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(EDITS.names()))
def test_spec_round_trips(name):
    required = {"mask": {"name": "sliding_window", "window": 3}, "suppress_keys": {"tokens": (0, 2)}}
    edit = EDITS.get(name)(**required.get(name, {}))
    assert parse_edit_spec(edit.spec()).spec() == edit.spec()


@pytest.mark.slow
def test_flex_path_runs_score_mod_edits_without_probs(model):
    # window_decay cannot run in SDPA; with flex=True it runs as a compiled FlexAttention score_mod.
    specs = ["temperature:tau=0.8", "zerotuning:gamma=2,heads=1", "window_decay:window=6,alpha=0.5",
             "sink_window:sinks=1,window=9", "first_key:alpha=0.5,heads=2"]
    mask = torch.ones_like(IDS)
    mask[1, :4] = 0  # left padding: positions come from the lookup tables, not the flex indices
    with torch.no_grad(), Session(model, edits=specs, flex=True) as session:
        flex = model(input_ids=IDS, attention_mask=mask).logits
    assert set(session.attention_paths.values()) == {"flex+edits"}
    eager, eager_session = logits_with(model, specs, probes=["entropy"], mask=mask)
    assert set(eager_session.attention_paths.values()) == {"blocked_eager+edits"}
    real = mask.bool()
    torch.testing.assert_close(flex[real], eager[real], atol=MODEL_LOGITS_ATOL, rtol=0)


def test_heads_that_do_not_exist_fail_before_anything_runs(model):
    with pytest.raises(ConfigError, match="num_heads=4"):
        Session(model, edits=["first_key:heads=4"])


def test_a_misspelled_second_edit_gets_the_registry_suggestion():
    from attnlab.edits import parse_edit_list

    with pytest.raises(RegistryError, match="Did you mean: temperature"):
        parse_edit_list("temperature:tau=0.9+temprature:tau=1")
    assert [e.spec() for e in parse_edit_list("head_scale:scale=0,heads=0+2+sink_window:sinks=1,window=3")] == [
        "head_scale:scale=0.0,heads=0+2", "sink_window:sinks=1,window=3"]


def test_concentric_positions_touch_every_head_of_every_layer(model):
    _, session = logits_with(model, ["concentric_positions:start=2,height=3,width=3,layers=1,heads=0"])
    report = session.edit_report()
    assert report.heads_touched[0] == 2 * 4 and report.forward_passes_touched[0] == 1


def test_the_no_change_hint_fits_the_edit():
    """The window hint only for edits with a window; var gets its own; others none."""
    from attnlab.capture.edit_log import _no_change_hint

    assert "window" in _no_change_hint(parse_edit_spec("sink_window:sinks=4,window=1000"))
    var_hint = _no_change_hint(parse_edit_spec("var:tau=3"))
    assert "window" not in var_hint and "tau=3" in var_hint
    assert _no_change_hint(parse_edit_spec("temperature:tau=2")) == ""


def test_keys_on_an_output_edit_reads_an_output_stage():
    with pytest.raises(ConfigError, match="which an output-stage edit"):
        parse_edit_spec("head_scale:scale=0,keys=image")
