"""Session on tiny random models: logits match SDPA, padding/GQA/sliding windows respected, state restored."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_bert, tiny_llama, tiny_qwen2_sliding

import attnlab
from attnlab.errors import ConfigError, RegistryError, UnsupportedModelError
from attnlab.testing import MODEL_LOGITS_ATOL

ALL_PROBES = ["entropy", "sink", "distance", "norms"]


def _left_padded(batch=2, length=20, pad=5, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


@torch.no_grad()
def test_no_probes_is_bit_identical_to_sdpa_llama_gqa_left_padding():
    model = tiny_llama()
    ids, mask = _left_padded()
    expected = model(input_ids=ids, attention_mask=mask).logits
    with attnlab.Session(model) as session:
        actual = model(input_ids=ids, attention_mask=mask).logits
    assert set(session.attention_paths.values()) == {"sdpa"}
    assert torch.equal(actual, expected)


@torch.no_grad()
@pytest.mark.parametrize("query_fraction", [1.0, 0.3])
def test_probes_leave_logits_unchanged_llama_gqa_left_padding(query_fraction):
    model = tiny_llama()
    ids, mask = _left_padded()
    expected = model(input_ids=ids, attention_mask=mask).logits
    with attnlab.Session(model, probes=ALL_PROBES, block_size=7, query_fraction=query_fraction) as session:
        actual = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=MODEL_LOGITS_ATOL, rtol=0)
    expected_path = "fused" if query_fraction == 1 else "sdpa+sampled_probs"
    assert session.attention_paths == {0: expected_path, 1: expected_path}
    assert not session.results()["value"].isna().any()


@torch.no_grad()
def test_bert_with_padding_matches_sdpa():
    model = tiny_bert()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with attnlab.Session(model, probes=ALL_PROBES) as session:
        actual = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=MODEL_LOGITS_ATOL, rtol=0)
    frame = session.results()
    assert {"entropy", "sink", "distance", "norms"} <= set(frame["probe"])


@torch.no_grad()
def test_qwen2_sliding_window_matches_sdpa_and_window_is_applied():
    model = tiny_qwen2_sliding(window=4)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(2))
    expected = model(input_ids=ids).logits
    with attnlab.Session(model, probes=["distance"]) as session:
        actual = model(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, atol=MODEL_LOGITS_ATOL, rtol=0)
    frame = session.results()
    mass = frame[(frame.statistic == "mass") & (frame.position >= 4)]
    assert len(mass) == 0 or mass["value"].abs().max() == 0  # nothing beyond the window of 4 keys
    full = tiny_qwen2_sliding(window=64)
    assert not torch.allclose(full(input_ids=ids).logits, expected)  # the window matters for this input


def test_restores_attention_implementation_even_on_exceptions():
    model = tiny_llama()
    with pytest.raises(RuntimeError, match="boom"):
        with attnlab.Session(model, probes=["entropy"]):
            assert model.config._attn_implementation == "attnlab"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    eager = tiny_llama()
    eager.set_attn_implementation("eager")
    with attnlab.Session(eager):
        pass
    assert eager.config._attn_implementation == "eager"


def test_unsupported_models_are_refused_with_the_class_name():
    with pytest.raises(UnsupportedModelError, match="Linear is not a transformers PreTrainedModel"):
        attnlab.Session(torch.nn.Linear(2, 2))
    model = tiny_llama()
    type(model)._supports_attention_backend = False
    try:
        with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM does not route attention"):
            attnlab.Session(model)
    finally:
        type(model)._supports_attention_backend = True


def test_bad_arguments():
    model = tiny_llama()
    with pytest.raises(RegistryError, match="Did you mean: entropy"):
        attnlab.Session(model, probes=["entropi"])
    with pytest.raises(ConfigError, match="query_fraction"):
        attnlab.Session(model, probes=["entropy"], query_fraction=0)
    with pytest.raises(ConfigError, match="block_size"):
        attnlab.Session(model, probes=["entropy"], block_size=0)
    with pytest.raises(ConfigError, match="once"):
        attnlab.Session(model, probes=["entropy", "entropy"])


@torch.no_grad()
def test_mixed_length_batch_equals_one_at_a_time():
    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    long_ids, short_ids = torch.randint(0, 97, (1, 16), generator=g), torch.randint(0, 97, (1, 10), generator=g)
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), short_ids], dim=1)
    batch_ids = torch.cat([long_ids, padded])
    batch_mask = torch.ones_like(batch_ids)
    batch_mask[1, :6] = 0
    with attnlab.Session(model, probes=ALL_PROBES) as together:
        model(input_ids=batch_ids, attention_mask=batch_mask)
    with attnlab.Session(model, probes=ALL_PROBES) as apart:
        model(input_ids=long_ids)
        model(input_ids=short_ids)
    a = together.results().set_index(["probe", "statistic", "layer", "head", "position"])["value"]
    b = apart.results().set_index(["probe", "statistic", "layer", "head", "position"])["value"]
    assert a.index.equals(b.index)
    torch.testing.assert_close(torch.tensor(a.values), torch.tensor(b.values), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_sessions_merge_by_addition():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))
    with attnlab.Session(model, probes=ALL_PROBES) as both:
        model(input_ids=ids)
    with attnlab.Session(model, probes=ALL_PROBES) as first:
        model(input_ids=ids[:1])
    with attnlab.Session(model, probes=ALL_PROBES) as second:
        model(input_ids=ids[1:])
    first.merge(second)
    a, b = both.results(), first.results()
    torch.testing.assert_close(torch.tensor(a["value"].values), torch.tensor(b["value"].values), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_layer_without_probs_needs_runs_fast_path_norms_only():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(8))
    expected = model(input_ids=ids).logits
    with attnlab.Session(model, probes=["norms"]) as session:
        actual = model(input_ids=ids).logits
    assert set(session.attention_paths.values()) == {"sdpa"}
    assert torch.equal(actual, expected)
    frame = session.results()
    assert set(frame.statistic) == {"residual_norm", "value_norm_kv", "residual_peak_ratio", "value_drain_ratio_kv"}
    assert frame[frame.statistic == "residual_norm"]["layer"].nunique() == 2


def test_probes_do_not_break_or_track_gradients():
    """Without no_grad the model still backpropagates through the blocked kernel; probe states hold no graph."""
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(9))
    with attnlab.Session(model, probes=ALL_PROBES) as session:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    for probe in session.probes:
        assert all(not t.requires_grad for t in probe.state().values())
    reference = tiny_llama()
    reference(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight.grad,
                               reference.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("probes", [[], ["entropy"]], ids=["fast-path", "probes"])
def test_learned_sink_logits_are_refused_not_ignored(probes):
    from tiny_models import tiny_gpt_oss

    model = tiny_gpt_oss()
    with pytest.raises(UnsupportedModelError, match="s_aux"):
        with attnlab.Session(model, probes=probes):
            model(input_ids=torch.randint(0, 97, (1, 8)))
    assert model.config._attn_implementation == "eager"


@torch.no_grad()
def test_static_cache_prefill_gives_the_same_statistics_as_no_cache():
    """A StaticCache holds empty slots after the prompt; they must never count as keys."""
    from transformers import StaticCache

    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(11))
    with attnlab.Session(model, probes=ALL_PROBES) as plain:
        expected_logits = model(input_ids=ids).logits
    cache = StaticCache(config=model.config, max_cache_len=16)
    with attnlab.Session(model, probes=ALL_PROBES) as cached:
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits
    torch.testing.assert_close(logits, expected_logits, atol=MODEL_LOGITS_ATOL, rtol=0)
    a = plain.results().set_index(["probe", "statistic", "layer", "head", "position"])["value"]
    b = cached.results().set_index(["probe", "statistic", "layer", "head", "position"])["value"]
    assert a.index.equals(b.index)
    torch.testing.assert_close(torch.tensor(b.values), torch.tensor(a.values), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_generation_without_attention_mask_is_unchanged_by_probes():
    """Decoding with a cache and no 2-D mask: each step's keys include the past, none may be dropped."""
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(12))
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    with attnlab.Session(model, probes=ALL_PROBES):
        actual = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(actual, expected)


@torch.no_grad()
@pytest.mark.parametrize(("probes", "edits", "path", "recorded"), [
    ((), (), "sdpa", "sdpa"),                     # the untouched SDPA shortcut asks the planner too
    (("norms",), (), "sdpa", "sdpa"),
    (("entropy",), (), "blocked_eager", "fused"),  # the planner's blocked_eager, served by the fused kernel
    (("entropy", "rope_decay"), (), "blocked_eager", "blocked_eager"),  # rope_decay has no fused form
    ((), ("head_scale:layers=[0],heads=[1],scale=0.5",), "sdpa+edits", "sdpa+edits"),
])
def test_the_planner_decides_every_attention_call(monkeypatch, probes, edits, path, recorded):
    from attnlab.capture.planner import Planner

    chosen = []
    original = Planner.choose

    def spy(self, needs, edit_facts, call):
        chosen.append(original(self, needs, edit_facts, call))
        return chosen[-1]

    monkeypatch.setattr(Planner, "choose", spy)
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    with attnlab.Session(model, probes=probes, edits=edits) as session:
        model(input_ids=ids)
        model(input_ids=ids[:1])
    assert len(chosen) == sum(session.calls_per_layer.values()) == 4
    assert session.attention_paths[0] == recorded and {p.value for p in chosen} >= {path}


def test_session_probe_names_the_available_probes():
    with attnlab.Session(tiny_llama(), probes=["entropy", "sink"]) as session:
        assert session.probe("sink").name == "sink"
        with pytest.raises(RegistryError, match="Did you mean: sink\\? Available: entropy, sink") as info:
            session.probe("sinks")
    assert isinstance(info.value, KeyError)
