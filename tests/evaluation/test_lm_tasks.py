"""Perplexity / next-token accuracy: window plans, and scores against a plain one-prefix-at-a-time computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import WORDS, tiny_llama, tiny_tokenizer

from attnlab.errors import ConfigError, TextError
from attnlab.evaluation.config import BASELINE, EvalConfig
from attnlab.evaluation.lm_tasks import TokenScores, plan_windows, score_tokens, stitch_windows
from attnlab.evaluation.runner import evaluate_variants, run_eval
from attnlab.testing import TOLERANCES


@given(num_tokens=st.integers(2, 200), window=st.integers(2, 40), data=st.data())
def test_every_token_with_context_is_scored_exactly_once(num_tokens, window, data):
    stride = data.draw(st.integers(1, window))
    max_windows = data.draw(st.integers(1, 12))
    if num_tokens < window:
        with pytest.raises(TextError):
            plan_windows(num_tokens, window, stride, max_windows)
        return
    plans = plan_windows(num_tokens, window, stride, max_windows)
    expected_windows = min(max_windows, (num_tokens - window) // stride + 1)
    assert len(plans) == expected_windows
    scored = [t for plan in plans for t in range(plan.first_scored, plan.end)]
    # Each token once, in order; never token 0, nor a window's first token when no earlier window covers it
    # (stride == window): it has no context inside its window.
    uncovered = {0} | {p.start for p, q in zip(plans[1:], plans) if p.start >= q.end}
    assert scored == [t for t in range(plans[-1].end) if t not in uncovered]
    if stride < window:
        assert scored == list(range(1, plans[-1].end))
    for plan in plans:
        assert plan.end - plan.start == window and plan.start == plan.index * stride
        assert plan.start < plan.first_scored <= plan.end  # every scored token has >= 1 token of context


def test_non_overlapping_and_overlapping_plans():
    assert [(p.start, p.end, p.first_scored) for p in plan_windows(10, 4, 4, 9)] == [(0, 4, 1), (4, 8, 5)]
    assert [(p.start, p.end, p.first_scored) for p in plan_windows(10, 4, 2, 9)] == [
        (0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert [p.num_scored for p in plan_windows(10, 4, 1, 3)] == [3, 1, 1]


@pytest.mark.parametrize("stride", [0, 5])
def test_stride_outside_the_window_is_refused(stride):
    with pytest.raises(ConfigError, match="stride must be in 1..4"):
        plan_windows(10, 4, stride, 2)


def _plain_scores(model, ids, plans, bos_id=None):
    """Independent reference: each scored token from its own prefix, one forward per token, float64 softmax."""
    nlls, hits = [], []
    for plan in plans:
        for t in range(plan.first_scored, plan.end):
            context = ([bos_id] if bos_id is not None else []) + ids[plan.start:t]
            logits = model(input_ids=torch.tensor([context])).logits[0, -1].double()
            nlls.append(-(logits[ids[t]] - torch.logsumexp(logits, 0)).item())
            hits.append(int(logits.argmax()) == ids[t])
    return float(np.sum(nlls)), len(nlls), int(np.sum(hits))


@pytest.mark.parametrize("stride", [12, 5, 1], ids=["no-overlap", "stride-5", "stride-1"])
@pytest.mark.parametrize("bos_id", [None, 1], ids=["no-bos", "bos"])
@torch.no_grad()
def test_scores_match_one_prefix_at_a_time(stride, bos_id):
    model = tiny_llama(seed=3).double()
    ids = torch.randint(3, 97, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    window = 12 - (bos_id is not None)
    plans = plan_windows(len(ids), window, min(stride, window), 3)
    rows, records = evaluate_variants(model, None, [(BASELINE, [])], tasks=("perplexity", "next_token"), ids=ids,
                                      plans=plans, bos_id=bos_id, seq_len=12, prompts=[])
    nll_sum, count, correct = _plain_scores(model, ids, plans, bos_id)
    record = records[0]
    tol = TOLERANCES[torch.float64]
    assert record["tokens_scored"] == count
    assert math.isclose(record["nll"], nll_sum / count, rel_tol=tol["rtol"] * 10, abs_tol=tol["atol"])
    assert math.isclose(record["perplexity"], math.exp(nll_sum / count), rel_tol=1e-6)
    assert record["next_token_accuracy"] == correct / count
    values = {(f"{r['probe']}@{r['variant']}", r["statistic"]): r["value"] for r in rows if r["position"] is None}
    assert values[("perplexity@baseline", "tokens_scored")] == count
    assert values[("next_token@baseline", "accuracy")] == correct / count


@torch.no_grad()
def test_score_tokens_without_logits_to_keep_gives_the_same():
    model = tiny_llama(seed=2).double()
    ids = torch.randint(3, 97, (1, 16), generator=torch.Generator().manual_seed(0))

    class NoKeep(torch.nn.Module):  # a forward without the logits_to_keep keyword
        def forward(self, input_ids, attention_mask=None):
            return model(input_ids=input_ids, attention_mask=attention_mask)

    nll, correct = score_tokens(model, ids, 7)
    nll2, correct2 = score_tokens(NoKeep(), ids, 7)
    np.testing.assert_allclose(nll, nll2, rtol=1e-12)
    assert (correct == correct2).all() and nll.shape == (7,)


def test_token_scores_bins():
    scores = TokenScores(seq_len=8)
    scores.add(0, np.array([1.0, 2.0, 3.0]), np.array([True, False, True]), np.array([1, 2, 7]))
    assert scores.count == 3 and scores.correct == 2 and math.isclose(scores.mean_nll, 2.0)
    assert scores.binned(4) == [(0, 1.5, 0.5, 2), (4, 3.0, 1.0, 1)]


def test_run_eval_on_a_text_file_matches_the_plain_computation(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(" ".join(WORDS[(7 * i) % len(WORDS)] for i in range(120)), encoding="utf-8")
    model, tokenizer = tiny_llama(seed=1), tiny_tokenizer()
    config = EvalConfig(text=str(path), seq_len=16, max_windows=5, stride=6, model="tiny")
    results = run_eval(config, model=model, tokenizer=tokenizer)
    ids = tokenizer(path.read_text(), add_special_tokens=False)["input_ids"]
    plans = plan_windows(len(ids), 16, 6, 5)
    with torch.no_grad():
        nll_sum, count, _ = _plain_scores(model, ids, plans)
    record = results["eval"]["variants"][0]
    assert record["tokens_scored"] == count == 15 + 4 * 6
    assert math.isclose(record["nll"], nll_sum / count, rel_tol=1e-5)
    assert [w["ids"] for w in results["windows"]] == [ids[p.start:p.end] for p in plans]
    assert results["command"] == "eval" and results["eval"]["stride"] == 6


def test_text_shorter_than_one_window_is_a_text_error(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("the cat sat", encoding="utf-8")
    with pytest.raises(TextError, match="3 tokens"):
        run_eval(EvalConfig(text=str(path), seq_len=16), model=tiny_llama(), tokenizer=tiny_tokenizer())


def test_a_search_on_fewer_than_two_windows_fails_before_any_variant_runs(tmp_path, monkeypatch):
    import attnlab.evaluation.runner as runner

    path = tmp_path / "words.txt"
    path.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(20)), encoding="utf-8")  # one 16-token window
    monkeypatch.setattr(runner, "evaluate_variants", lambda *a, **k: pytest.fail("variants ran before the check"))
    with pytest.raises(ConfigError, match="--search needs >= 2 windows.*gives 1"):
        run_eval(EvalConfig(text=str(path), seq_len=16, max_windows=4), model=tiny_llama(),
                 tokenizer=tiny_tokenizer(), search="act")


def test_a_passed_in_model_runs_where_its_weights_are(tmp_path):
    # config.device names a device the CPU model is not on; the inputs must follow the model, not the config.
    path = tmp_path / "words.txt"
    path.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(60)), encoding="utf-8")
    config = EvalConfig(text=str(path), seq_len=16, max_windows=2, device="meta")
    results = run_eval(config, model=tiny_llama(seed=1), tokenizer=tiny_tokenizer())
    assert math.isfinite(results["eval"]["variants"][0]["perplexity"])


def test_stitch_windows_rebuilds_the_text_from_overlapping_windows():
    text = list(range(100, 120))
    windows = [(0, text[0:8]), (5, text[5:13]), (10, text[10:18])]  # stride 5, window 8
    assert stitch_windows(windows) == text[:18]
