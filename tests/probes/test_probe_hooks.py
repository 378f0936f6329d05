"""Probe.prepare / needs_runner / bind: rope_decay reads the model's RoPE settings in bind; only probes that
declare needs_runner (magnets) make the pipeline build a ModelRunner."""

from __future__ import annotations

import pytest
import torch
from tiny_models import WORDS, tiny_bert, tiny_llama, tiny_tokenizer

import attnlab
from attnlab.config import RunConfig
from attnlab.errors import ConfigError
from attnlab.probes import PROBES
from attnlab.probes.base import Probe
from attnlab.probes.magnets import MagnetsProbe
from attnlab.probes.rope_decay import RopeDecayProbe


def _run(model, probes):
    with attnlab.Session(model, probes=probes), torch.no_grad():
        model(input_ids=torch.arange(1, 17)[None], attention_mask=torch.ones(1, 16, dtype=torch.long))


def test_rope_decay_reads_rope_settings_from_the_facts_in_bind():
    model = tiny_llama(rope_theta=5000.0)
    session = attnlab.Session(model, probes=["rope_decay"])
    with session, torch.no_grad():
        model(input_ids=torch.arange(1, 17)[None])
    (probe,) = session.probes
    assert probe.rope_theta == 5000.0 and probe.head_dim == 8
    assert any(row["statistic"] == "rope_bound" for row in probe.rows())


def test_explicit_rope_settings_win_over_the_model():
    probe = RopeDecayProbe(rope_theta=123.0, head_dim=4)
    _run(tiny_llama(rope_theta=5000.0), [probe])
    assert (probe.rope_theta, probe.head_dim) == (123.0, 4)


def test_rope_decay_on_a_model_without_rope_needs_a_theta():
    with pytest.raises(ConfigError, match="no rope_theta"):
        _run(tiny_bert(), [RopeDecayProbe()])


def test_only_magnets_declares_it_needs_a_runner():
    assert Probe.needs_runner is False and MagnetsProbe.needs_runner is True
    assert [name for name in PROBES.names() if PROBES.get(name).needs_runner] == ["magnets"]
    assert Probe().prepare(None, None) is None  # the default hook does nothing


def test_the_pipeline_builds_a_runner_only_for_probes_that_need_one(tmp_path, monkeypatch):
    import attnlab.capture.runner as runner_module
    from attnlab.pipeline import run_probes

    text = tmp_path / "words.txt"
    text.write_text(" ".join(WORDS[(i * 5) % len(WORDS)] for i in range(200)), encoding="utf-8")
    built = []
    real = runner_module.ModelRunner
    monkeypatch.setattr(runner_module, "ModelRunner", lambda *a, **k: built.append(1) or real(*a, **k))
    config = RunConfig(text=str(text), seq_len=16, max_windows=1, bos="never", probes=("rope_decay", "entropy"))
    results = run_probes(config, model=tiny_llama(), tokenizer=tiny_tokenizer())
    assert built == [] and any(r["probe"] == "rope_decay" for r in results["rows"])
    results = run_probes(RunConfig(text=str(text), seq_len=16, max_windows=1, bos="never", probes=("magnets",)),
                         model=tiny_llama(), tokenizer=tiny_tokenizer())
    assert built == [1] and any(r["probe"] == "magnets" for r in results["rows"])
