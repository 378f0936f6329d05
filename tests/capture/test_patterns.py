"""attention_pattern / PatternProbe / Session.patterns on tiny random models: equal to transformers' eager
``output_attentions`` on the real tokens (GQA, left/right padding, sliding window, GPT-2, sequences longer than a
block), memory bounded to the chosen heads, bad input refused in one line, and the report viewer's data."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import WORDS, tiny_bert, tiny_llama, tiny_qwen2_sliding, tiny_tokenizer

import attnlab
from attnlab.capture.loading import LoadedModel
from attnlab.capture.pattern_report import SINK_EPSILON, pick_heads, report_patterns
from attnlab.capture.patterns import AttentionPattern, PatternProbe, attention_pattern
from attnlab.errors import ConfigError

ATOL = 1e-5  # float32 eager softmax vs the blocked kernel's float32 softmax


def _tiny_gpt2(positions: int = 512):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=positions,
                        attn_implementation="sdpa")
    return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def _eager_probs(model, **batch):
    """transformers' own probs: the same config and weights with attn_implementation="eager" (switched back after)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        return model(**batch, output_attentions=True).attentions  # per layer (B, H, L, L)
    finally:
        model.set_attn_implementation(previous)


def _assert_equal_to_eager(pattern, expected, mask):
    for layer in pattern.layers:
        for b in range(mask.shape[0]):
            real = mask[b].bool()
            reference = expected[layer][b][:, real][:, :, real]  # (H, n, n) on the real tokens
            for head in pattern.heads:
                torch.testing.assert_close(pattern.get(layer, head, b), reference[head].float(), atol=ATOL, rtol=0)


@functools.cache
def _model():
    return tiny_llama(num_heads=4, num_kv_heads=1)


def _ids(batch, length, seed=0, vocab=97):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- equal to HF eager ---------------------------------------------------------------------------------------------
def test_llama_gqa_left_padding_past_the_block_width_equals_eager():
    """Finding 1: 300 tokens in blocks of 64, whose key axis is narrower than kv_len (a causal block sees only
    the keys up to its last query)."""
    model = tiny_llama(num_heads=4, num_kv_heads=2)
    ids = _ids(2, 300)
    mask = torch.ones_like(ids)
    mask[0, :37] = 0  # left padding
    pattern = attention_pattern(model, {"input_ids": ids, "attention_mask": mask}, block_size=64)
    assert pattern.probs.shape == (2, 2, 4, 300, 300) and pattern.probs.dtype == torch.float32
    assert pattern.paths == {0: "blocked_eager", 1: "blocked_eager"} and pattern.causal
    _assert_equal_to_eager(pattern, _eager_probs(model, input_ids=ids, attention_mask=mask), mask)
    assert pattern.get(1, 3, 0).shape == (263, 263)
    assert pattern.probs[0, :, :, :37].abs().max() == 0 and pattern.probs[0, ..., :37].abs().max() == 0


def test_bert_right_padding_equals_eager():
    model = tiny_bert()
    ids = _ids(2, 40, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0
    pattern = attention_pattern(model, {"input_ids": ids, "attention_mask": mask}, block_size=16)
    assert not pattern.causal
    _assert_equal_to_eager(pattern, _eager_probs(model, input_ids=ids, attention_mask=mask), mask)
    frame = pattern.to_frame()  # bidirectional: every real key of every real query
    assert len(frame) == (40 * 40 + 29 * 29) * len(pattern.layers) * len(pattern.heads)


def test_qwen2_sliding_window_equals_eager():
    model = tiny_qwen2_sliding(window=4)
    ids = _ids(1, 40, seed=2)
    pattern = attention_pattern(model, ids[0], block_size=8)  # a 1-D input_ids tensor
    mask = torch.ones_like(ids)
    _assert_equal_to_eager(pattern, _eager_probs(model, input_ids=ids, attention_mask=mask), mask)
    weights = pattern.get(0, 0)
    assert weights[20, :17].abs().max() == 0 and weights[20, 17:21].sum() == pytest.approx(1, abs=1e-5)


def test_gpt2_past_the_block_width_equals_eager():
    model = _tiny_gpt2()
    ids = _ids(1, 300, seed=3)
    pattern = attention_pattern(model, ids, layers=1, heads=[2, 0], block_size=64)
    assert pattern.layers == (1,) and pattern.heads == (2, 0)
    _assert_equal_to_eager(pattern, _eager_probs(model, input_ids=ids), torch.ones_like(ids))


def test_only_the_chosen_heads_are_stored():
    model = tiny_llama(num_heads=4, num_kv_heads=2)
    pattern = attention_pattern(model, _ids(3, 50), layers=[1], heads=[3, 1], block_size=16)
    assert pattern.probs.shape == (3, 1, 2, 50, 50)
    with pytest.raises(ConfigError, match="layer 0 was not recorded"):
        pattern.get(0, 3)
    with pytest.raises(ConfigError, match="head 0 was not recorded"):
        pattern.get(1, 0)


@given(length=st.integers(2, 40), pad=st.integers(0, 10), block_size=st.integers(1, 48), left=st.booleans())
def test_rows_of_real_queries_sum_to_one(length, pad, block_size, left):
    ids = _ids(2, length + pad, seed=length)
    mask = torch.ones_like(ids)
    if left:
        mask[1, :pad] = 0
    else:
        mask[1, length:] = 0
    pattern = attention_pattern(_model(), {"input_ids": ids, "attention_mask": mask}, block_size=block_size)
    for b in range(2):
        for layer in pattern.layers:
            sums = torch.stack([pattern.get(layer, head, b).sum(-1) for head in pattern.heads])
            torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
        assert pattern.get(0, 0, b).shape == (int(mask[b].sum()),) * 2


# -- inputs and errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layers": 40}, "layers must be in 0..1, got 40"),
    ({"heads": [0, 4]}, "heads must be in 0..3, got 4"),
    ({"layers": []}, "non-empty list"),
    ({"heads": True}, "heads must be an int"),
    ({"layers": [0, 7, 9]}, "layers must be in 0..1, got 7"),
])
def test_bad_layers_or_heads_give_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        attention_pattern(_model(), _ids(1, 5), **kwargs)


@pytest.mark.parametrize(("inputs", "message"), [
    ("the cat", "needs a tokenizer"),
    (torch.zeros(1, 0, dtype=torch.long), "no tokens"),
    (torch.zeros(2, 3), "integer tensor"),
    ({"attention_mask": torch.ones(1, 3)}, "dict with input_ids"),
    ([["a"]], "token ids"),
])
def test_bad_inputs_give_config_errors(inputs, message):
    with pytest.raises(ConfigError, match=message):
        attention_pattern(_model(), inputs)


def test_text_with_a_loaded_model_gives_tokens_frame_and_plot():
    from matplotlib.figure import Figure

    loaded = LoadedModel.wrap(tiny_llama(), tiny_tokenizer(add_bos=True))
    text = " ".join(WORDS[:6])
    pattern = attention_pattern(loaded, text, layers=0, heads=[1])
    assert pattern.tokens == [["<s>", *WORDS[:6]]] and pattern.tokens_of(0) == ["<s>", *WORDS[:6]]
    frame = pattern.to_frame()
    assert list(frame.columns) == ["batch", "layer", "head", "query", "key", "weight"]
    assert len(frame) == 7 * 8 // 2 and (frame["key"] <= frame["query"]).all()  # causal: no masked future keys
    row = frame[(frame["query"] == 3) & (frame["key"] == 2)].iloc[0]
    assert row["weight"] == pytest.approx(float(pattern.get(0, 1)[3, 2]))
    assert frame.groupby("query")["weight"].sum().to_numpy() == pytest.approx(np.ones(7), abs=1e-5)
    figure = pattern.plot(0, 1)
    assert isinstance(figure, Figure)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["<s>", *WORDS[:6]]
    assert ax.get_title() == "layer 0 head 1 (blocked_eager)"
    assert attnlab.attention_pattern is attention_pattern and attnlab.AttentionPattern is type(pattern)


def test_session_patterns_one_per_forward_and_refused_without_the_probe():
    model = tiny_llama()
    with attnlab.Session(model, probes=[PatternProbe(layers=[1], heads=[0, 1])], query_fraction=0.3) as session:
        with torch.no_grad():
            model(input_ids=_ids(1, 12))
            model(input_ids=_ids(2, 7, seed=5))
    first, second = session.patterns()
    assert first.probs.shape == (1, 1, 2, 12, 12) and second.probs.shape == (2, 1, 2, 7, 7)
    assert first.paths == {1: "blocked_eager"}  # every_row: never the sampled path
    with attnlab.Session(model, probes=["entropy"]) as plain, torch.no_grad():
        model(input_ids=_ids(1, 5))
    with pytest.raises(ConfigError, match="no PatternProbe"):
        plain.patterns()


@pytest.mark.parametrize("layers, heads", [
    (np.int64(1), np.array([3, 0])),
    (torch.tensor(1), torch.tensor([3, 0])),
    ([np.int64(1)], [torch.tensor(3), np.int32(0)]),
])
def test_numpy_and_torch_integers_select_layers_and_heads(layers, heads):
    pattern = attention_pattern(_model(), _ids(1, 6), layers=layers, heads=heads)
    assert pattern.layers == (1,) and pattern.heads == (3, 0)
    assert all(type(i) is int for i in pattern.layers + pattern.heads)


def test_a_probe_reused_in_a_new_session_forgets_the_old_passes():
    model = tiny_llama()
    probe = PatternProbe(layers=[0], heads=[0])
    with attnlab.Session(model, probes=[probe]) as first, torch.no_grad():
        model(input_ids=_ids(1, 9))
    assert [p.probs.shape[-1] for p in first.patterns()] == [9]
    with attnlab.Session(model, probes=[probe]) as second, torch.no_grad():
        model(input_ids=_ids(1, 5))
    assert [p.probs.shape[-1] for p in second.patterns()] == [5]


def test_assembling_makes_no_second_copy_of_the_probs():
    """The per-layer tensors move into the one (B, layers, heads, q, k) tensor (they become its views), so the
    recorded weights are held once; asking again returns the same tensor."""
    model = tiny_llama()
    probe = PatternProbe(layers=[0, 1], heads=[1, 2])
    with attnlab.Session(model, probes=[probe]) as session, torch.no_grad():
        model(input_ids=_ids(2, 11))
    (pattern,) = session.patterns()
    (again,) = session.patterns()
    assert again.probs is pattern.probs
    base = pattern.probs.untyped_storage().data_ptr()
    stored = [layer_probs for layer_probs, _ in probe._forwards[0].calls.values()]
    assert len(stored) == 2 and all(t.untyped_storage().data_ptr() == base for t in stored)


def test_implied_map_of_a_linear_attention_layer():
    from attnlab.lab.modeling import TinyLMSpec, build_model

    spec = TinyLMSpec(layer="gla", vocab_size=50, num_layers=2, hidden_size=32, num_heads=2, mlp_ratio=1.0,
                      positions="none")
    model = build_model(spec, seed=0).eval()
    pattern = attention_pattern(model, _ids(1, 20, vocab=50), block_size=8)
    assert pattern.paths == {0: "implied:signed", 1: "implied:signed"}
    assert pattern.probs.shape == (1, 2, 2, 20, 20)
    sums = pattern.probs[0].sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)  # |w| / Σ|w| per row


# -- the report viewer's data --------------------------------------------------------------------------------------
def _windows(ids):
    return SimpleNamespace(windows=[{"ids": ids}, {"ids": ids[::-1]}])


def test_report_patterns_auto_json_shape():
    loaded = LoadedModel.wrap(tiny_llama(num_heads=8, num_kv_heads=2, layers=3), tiny_tokenizer())
    ids = _ids(1, 40)[0].tolist()
    data = report_patterns(loaded, _windows(ids), "auto", 24)
    assert set(data) == {"window", "tokens", "causal", "selection", "heads"}
    assert data["window"] == 0 and data["causal"] is True and data["selection"] == "auto"
    assert data["tokens"] == [loaded.tokenizer.decode([i]) for i in ids[:24]]
    heads = data["heads"]
    assert len(heads) == 8 and len({(h["layer"], h["head"]) for h in heads}) == len(heads)
    sinks = [h for h in heads if h["label"].startswith("sink α₀=")]
    assert len(sinks) <= 4 and heads[:len(sinks)] == sinks
    assert all(h["label"].startswith("entropy ") for h in heads[len(sinks):])
    full = attention_pattern(loaded, torch.tensor([ids[:24]]))
    for entry in heads:
        assert [len(row) for row in entry["probs"]] == list(range(1, 25))
        assert all(round(w, 4) == w for row in entry["probs"] for w in row)
        expected = full.get(entry["layer"], entry["head"])
        assert entry["probs"][23] == [round(float(w), 4) for w in expected[23]]
    alpha = [float(full.get(h["layer"], h["head"])[1:, 0].mean()) for h in heads]
    assert alpha[:len(sinks)] == sorted(alpha[:len(sinks)], reverse=True)
    assert all(a >= SINK_EPSILON for a in alpha[:len(sinks)]) and all(a < SINK_EPSILON for a in alpha[len(sinks):])
    for head, a in zip(sinks, alpha):
        assert float(head["label"].split("=")[1]) == pytest.approx(a, abs=0.006)


def test_report_patterns_explicit_none_and_bidirectional():
    loaded = LoadedModel.wrap(tiny_bert(), tiny_tokenizer())
    ids = _ids(1, 30)[0].tolist()
    assert report_patterns(loaded, _windows(ids), "none", 24) is None
    data = report_patterns(loaded, _windows(ids), "1.3,0.0", 10)
    assert data["selection"] == "explicit" and data["causal"] is False
    assert [(h["layer"], h["head"], h["label"]) for h in data["heads"]] == [(1, 3, ""), (0, 0, "")]
    assert [len(row) for row in data["heads"][0]["probs"]] == [10] * 10
    with pytest.raises(ConfigError, match="pattern_heads: layer must be in 0..1, got 2"):
        report_patterns(loaded, _windows(ids), "2.0", 10)


def test_report_patterns_warns_when_the_window_caps_pattern_tokens(caplog):
    """Walkthrough: --pattern-tokens above --seq-len was capped silently."""
    loaded = LoadedModel.wrap(tiny_llama(), tiny_tokenizer())
    ids = _ids(1, 12)[0].tolist()
    with caplog.at_level("WARNING", logger="attnlab.capture.pattern_report"):
        data = report_patterns(loaded, _windows(ids), "0.1", 64)
    assert len(data["tokens"]) == 12
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["pattern_tokens 64 capped at 12: the first window has 12 tokens (--seq-len)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="attnlab.capture.pattern_report"):
        report_patterns(loaded, _windows(ids), "0.1", 12)
    assert not caplog.records


@pytest.mark.slow
def test_bundled_smollm2_one_layer_equals_eager():
    loaded = attnlab.load_model("smollm2-135m")
    windows = attnlab.load_text(loaded.tokenizer, seq_len=64, max_windows=1)
    batch = next(iter(windows))
    pattern = attention_pattern(loaded, batch, layers=[5], heads=[0, 4, 8], block_size=16)
    assert pattern.probs.shape == (1, 1, 3, 64, 64) and pattern.tokens[0] == windows.windows[0]["tokens"]
    expected = _eager_probs(loaded.model, **batch)
    for head in (0, 4, 8):
        torch.testing.assert_close(pattern.get(5, head), expected[5][0, head], atol=ATOL, rtol=0)


def test_pick_heads_low_entropy_skips_sinks():
    """Head 0 is a pure sink (entropy 0), head 1 attends to the previous token (entropy 0, α₀ 0 past row 1), head 2
    is uniform: the sink is picked as a sink, the previous-token head as the sharpest non-sink, never the sink twice."""
    n = 6
    sink = torch.zeros(n, n)
    sink[:, 0] = 1
    previous = torch.zeros(n, n)
    previous[0, 0] = 1
    previous[torch.arange(1, n), torch.arange(0, n - 1)] = 1
    uniform = torch.tril(torch.ones(n, n))
    uniform = uniform / uniform.sum(-1, keepdim=True)
    probs = torch.stack([sink, previous, uniform])[None, None]  # (1, 1, 3, n, n)
    pattern = AttentionPattern(probs=probs, layers=(0,), heads=(0, 1, 2), valid=torch.ones(1, n, dtype=torch.bool))
    picked = pick_heads(pattern, count=1)
    assert [(layer, head) for layer, head, _ in picked] == [(0, 0), (0, 1)]
    assert picked[0][2] == "sink α₀=1.00" and picked[1][2].startswith("entropy ")


def test_pick_heads_takes_no_sinks_below_epsilon():
    """A model without sinks (α₀ tiny everywhere, as BERT): no head is labelled a sink; all 2·count slots go to
    the lowest-entropy heads."""
    n = 6
    previous = torch.zeros(n, n)
    previous[0, 0] = 1
    previous[torch.arange(1, n), torch.arange(0, n - 1)] = 1
    uniform = torch.tril(torch.ones(n, n))
    uniform = uniform / uniform.sum(-1, keepdim=True)
    weak = 0.9 * previous + 0.1 * uniform  # α₀ ≈ 0.03 past row 1: not a sink
    probs = torch.stack([uniform, previous, weak])[None, None]  # (1, 1, 3, n, n)
    pattern = AttentionPattern(probs=probs, layers=(0,), heads=(0, 1, 2), valid=torch.ones(1, n, dtype=torch.bool))
    picked = pick_heads(pattern, count=1)
    assert [(layer, head) for layer, head, _ in picked] == [(0, 1), (0, 2)]
    assert all(label.startswith("entropy ") for _, _, label in picked)
