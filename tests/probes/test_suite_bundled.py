"""Probe-suite probes on the bundled SmolLM2-135M and MiniLM-L6 reading the bundled corpus (≤ 256 tokens)."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.capture.model_probes import ModelRunner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = attnlab.load_model("smollm2-135m")
    windows = attnlab.load_text(tokenizer, seq_len=64, max_windows=1)
    return model, tokenizer, next(iter(windows))


def _rows(probe, statistic):
    return [r for r in probe.rows() if r["statistic"] == statistic]


def test_massive_activations_sit_on_the_first_token_padded_or_not(smollm2):
    model, _, batch = smollm2
    padded = {"input_ids": torch.cat([torch.zeros(1, 8, dtype=torch.long), batch["input_ids"]], 1),
              "attention_mask": torch.cat([torch.zeros(1, 8, dtype=torch.long), batch["attention_mask"]], 1)}
    found = []
    for inputs in (batch, padded):
        with attnlab.Session(model, probes=["massive_activations"]) as session, torch.no_grad():
            model(**inputs)
        rates = {(r["layer"], r["position"]) for r in _rows(session.probe("massive_activations"),
                                                            "massive_token_rate")}
        found.append(rates)
    assert found[0] == found[1]  # padding shifts nothing: positions count real tokens
    assert found[0] and {position for _, position in found[0]} == {0}
    assert {layer for layer, _ in found[0]} >= set(range(12, 27))


def test_inflection_and_active_dormant_on_smollm2(smollm2):
    from attnlab.probes.active_dormant import ActiveDormantProbe
    from attnlab.probes.inflection import InflectionProbe

    model, tokenizer, batch = smollm2
    runner = ModelRunner(model, tokenizer)
    inflection, dormant = InflectionProbe(), ActiveDormantProbe(layers=[3])
    for probe in (inflection, dormant):
        probe.prepare(runner.info)
        probe.observe(runner, batch)
    norms = [r["value"] for r in _rows(inflection, "activation_grad_norm")]
    assert len(norms) == 30 and all(0 < v < float("inf") for v in norms)
    assert 1 <= sum(r["value"] for r in _rows(inflection, "inflection_band")) <= 30
    fraction = _rows(dormant, "dormant_fraction")
    assert [r["layer"] for r in fraction] == [3] and 0.0 <= fraction[0]["value"] <= 1.0
    assert all(p.grad is None for p in model.parameters())


def test_minilm_embeddings_collapse_with_length():
    from attnlab.probes.length_collapse import LengthCollapseProbe

    model, tokenizer = attnlab.load_model("minilm-l6")
    runner = ModelRunner(model, tokenizer)
    probe = LengthCollapseProbe(lengths=[8, 48], count=8)
    probe.prepare(runner.info)
    for batch in attnlab.load_text(tokenizer, seq_len=256, max_windows=2):
        probe.observe(runner, batch)
    probe.finish(runner)
    cosine = {r["position"]: r["value"] for r in _rows(probe, "mean_cosine")}
    assert cosine[48] > cosine[8]
