"""Probe-suite probes on the bundled SmolLM2-135M and MiniLM-L6 reading the bundled corpus (≤ 256 tokens)."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.capture.runner import ModelRunner

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
    from attnlab.analyses.active_dormant import ActiveDormantAnalysis
    from attnlab.analyses.inflection import InflectionAnalysis

    model, tokenizer, batch = smollm2
    runner = ModelRunner(model, tokenizer)
    inflection, dormant = InflectionAnalysis(), ActiveDormantAnalysis(layers=[3])
    for probe in (inflection, dormant):
        probe.prepare(runner.facts, runner)
        probe.observe(runner, batch)
    norms = [r["value"] for r in _rows(inflection, "activation_grad_norm")]
    assert len(norms) == 30 and all(0 < v < float("inf") for v in norms)
    assert 1 <= sum(r["value"] for r in _rows(inflection, "inflection_band")) <= 30
    fraction = _rows(dormant, "dormant_fraction")
    assert [r["layer"] for r in fraction] == [3] and 0.0 <= fraction[0]["value"] <= 1.0
    assert all(p.grad is None for p in model.parameters())


def test_minilm_embeddings_collapse_with_length():
    from attnlab.analyses.length_collapse import LengthCollapseAnalysis

    model, tokenizer = attnlab.load_model("minilm-l6")
    runner = ModelRunner(model, tokenizer)
    probe = LengthCollapseAnalysis(lengths=[8, 48], count=8)
    probe.prepare(runner.facts, runner)
    for batch in attnlab.load_text(tokenizer, seq_len=256, max_windows=2):
        probe.observe(runner, batch)
    probe.finish(runner)
    cosine = {r["position"]: r["value"] for r in _rows(probe, "mean_cosine")}
    assert cosine[48] > cosine[8]


def test_magnets_rope_and_spatial_decay_on_smollm2(smollm2):
    from attnlab.probes.magnets import MagnetsProbe
    from attnlab.probes.rope_decay import RopeDecayProbe
    from attnlab.probes.spatial_decay import SpatialDecayProbe

    model, tokenizer, batch = smollm2
    runner = ModelRunner(model, tokenizer)
    magnets, rope, spatial = MagnetsProbe(), RopeDecayProbe(), SpatialDecayProbe(grid=[4, 8], start=1)
    magnets.prepare(runner.facts, runner)
    rope.prepare(runner.facts, runner)
    with attnlab.Session(model, probes=[magnets, rope, spatial]), torch.no_grad():
        model(**batch)
    shares: dict[tuple[int, int], float] = {}
    for r in _rows(magnets, "class_share"):  # each head's attention over the five classes sums to 1
        shares[(r["layer"], r["head"])] = shares.get((r["layer"], r["head"]), 0.0) + r["value"]
    assert len(shares) == 30 * 9 and all(v == pytest.approx(1.0, abs=1e-5) for v in shares.values())
    assert any(r["value"] > 0 for r in _rows(magnets, "class_share") if r["position"] == 3)  # stop words
    assert (rope.rope_theta, rope.head_dim) == (100000.0, 64)  # SmolLM2-135M's config
    assert _rows(rope, "rope_bound")[0]["value"] == pytest.approx(1.0)
    correlations = _rows(rope, "bound_correlation")
    assert len(correlations) == 30 and all(-1 <= r["value"] <= 1 for r in correlations)
    at_zero = [r["value"] for r in _rows(spatial, "relative_attention") if r["position"] == 0]
    assert len(at_zero) == 30 and all(v == pytest.approx(1.0) for v in at_zero)  # A_qq / A_qq
    assert _rows(spatial, "energy_beta") and all(0 <= r["value"] <= 1 + 1e-9 for r in _rows(spatial, "energy_r2"))


def test_model_level_suite_probes_on_smollm2(smollm2):
    from attnlab.analyses import ANALYSES
    from attnlab.analyses.memory_fidelity import SKIP_MESSAGE

    model, tokenizer, batch = smollm2
    runner = ModelRunner(model, tokenizer)
    runner.other = runner  # cka of the model with itself
    probes = {"cka": {}, "head_divergence": {"context": 16}, "head_importance": {"layers": [0], "top_k": 3},
              "head_overlap": {"layers": [0], "top_k": 3}, "contrast": {}, "memory_fidelity": {}}
    made = {name: ANALYSES.get(name)(**args) for name, args in probes.items()}
    for probe in made.values():
        probe.prepare(runner.facts, runner)
        probe.observe(runner, batch)
    made["head_overlap"].observe(runner, batch)  # the same window twice: text A == text B
    for probe in made.values():
        probe.finish(runner)
    assert [r["value"] for r in _rows(made["cka"], "cka")] == pytest.approx([1.0] * 30)
    divergence = _rows(made["head_divergence"], "divergence")
    assert len(divergence) == 30 * 9 and all(r["value"] >= 0 for r in divergence)
    importance = _rows(made["head_importance"], "importance")
    assert {(r["layer"], r["head"]) for r in importance} == {(0, h) for h in range(9)}
    assert _rows(made["head_overlap"], "overlap_iou")[0]["value"] == 1.0
    kl = _rows(made["contrast"], "kl_task_generic")
    assert len(kl) == 30 and all(r["value"] >= 0 for r in kl)
    assert made["memory_fidelity"].rows() == [] and made["memory_fidelity"].extras()["skipped"] == SKIP_MESSAGE
