"""attnlab.pipeline.run_probes: one run path; analyses dispatched by registry; no ModelRunner unless needed."""

from __future__ import annotations

import pytest
from tiny_models import WORDS, tiny_llama, tiny_tokenizer

from attnlab.analyses import ANALYSES
from attnlab.analyses.base import Analysis
from attnlab.capture.loading import LoadedModel
from attnlab.config import RunConfig, probe_kind
from attnlab.errors import ConfigError


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(" ".join(WORDS[(i * 5) % len(WORDS)] for i in range(200)), encoding="utf-8")
    return str(path)


class TokenCount(Analysis):
    """Counts real tokens per batch (an analysis defined in the test)."""

    name = "token_count"

    def __init__(self, scale: int = 1) -> None:
        self.scale, self.tokens, self.prepared_with = scale, 0, None

    def prepare(self, facts, runner):
        self.prepared_with = (facts, runner.facts)

    def observe(self, runner, batch):
        self.tokens += int(batch["attention_mask"].sum()) * self.scale

    def rows(self):
        return [{"probe": self.name, "statistic": "tokens", "layer": None, "head": None, "position": None,
                 "value": float(self.tokens)}]


@pytest.fixture
def token_count(monkeypatch):
    ANALYSES.names()  # load the built-ins first
    monkeypatch.setitem(ANALYSES._items, "token_count", TokenCount)
    seen = []
    monkeypatch.setattr(TokenCount, "finish", lambda self, runner: seen.append(self), raising=False)
    return seen


def test_an_analysis_runs_beside_attention_probes(text, token_count):
    from attnlab.pipeline import run_probes

    assert probe_kind("token_count") == "analysis" and probe_kind("entropy") == "attention"
    assert probe_kind("inflection") == "analysis"
    loaded = LoadedModel.wrap(tiny_llama(), tiny_tokenizer(), name="tiny")
    config = RunConfig(text=text, seq_len=16, max_windows=2, bos="never", probes=("entropy", "token_count"),
                       probe_args={"token_count": {"scale": 3}})
    results = run_probes(config, model=loaded)
    (analysis,) = token_count
    assert analysis.prepared_with == (loaded.facts, loaded.facts)
    counted = [row["value"] for row in results["rows"] if row["probe"] == "token_count"]
    assert counted == [3.0 * 16 * 2]
    assert {row["probe"] for row in results["rows"]} == {"entropy", "token_count"}
    assert results["model"]["name"] == "tiny" and results["model"]["num_kv_heads"] == 2
    with pytest.raises(ConfigError, match="bad --probe-arg for token_count"):
        run_probes(RunConfig(text=text, seq_len=16, probes=("token_count",), probe_args={"token_count": {"x": 1}}),
                   model=loaded)


def test_attention_probes_alone_build_no_model_runner(text, monkeypatch):
    import attnlab.capture.runner as runner_module
    from attnlab.pipeline import run_probes

    def never(*args, **kwargs):
        raise AssertionError("a ModelRunner was built for attention probes")

    monkeypatch.setattr(runner_module, "ModelRunner", never)
    results = run_probes(RunConfig(text=text, seq_len=16, max_windows=1, bos="never"),
                         model=tiny_llama(), tokenizer=tiny_tokenizer(), command="report")
    assert results["command"] == "report" and {r["probe"] for r in results["rows"]} == {
        "entropy", "sink", "distance", "norms"}
