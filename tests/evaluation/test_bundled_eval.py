"""``attnlab eval`` on the bundled SmolLM2 and Shakespeare (slow: needs the fetched assets), ≤ 256 tokens."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from attnlab.capture.loading import load_model

    return load_model("smollm2-135m")


def test_perplexity_passkey_and_an_edit_on_smollm2(smollm2):
    from attnlab.evaluation import EvalConfig, run_eval

    model, tokenizer = smollm2
    config = EvalConfig(seq_len=64, max_windows=2, tasks=("perplexity", "next_token", "passkey"),
                        variants=("sink_window:sinks=4,window=16",), passkey_lengths=(96,),
                        passkey_depths=(0.5,), passkey_trials=1)
    results = run_eval(config, model=model, tokenizer=tokenizer)
    base, edited = results["eval"]["variants"]
    assert base["tokens_scored"] == 2 * 63
    assert 2.0 < base["perplexity"] < 200.0  # an English-trained LM on English text, not a random one
    assert 0.1 < base["next_token_accuracy"] < 0.9
    assert math.isfinite(edited["perplexity"]) and edited["perplexity"] != base["perplexity"]
    assert edited["edit_report"][0]["calls_touched"] > 0
    prompt_trials = base["passkey"]["trials"]
    assert len(prompt_trials) == 1 and len(prompt_trials[0]["key"]) == 5
