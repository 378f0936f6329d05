"""The analyses tier: its registry and base class, the runner protocol, and head interventions through the edits."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama
from typer.testing import CliRunner

from attnlab.analyses import ANALYSES, probe_or_analysis
from attnlab.analyses.base import Analysis, Runner
from attnlab.capture.runner import ModelRunner, head_edits
from attnlab.errors import ConfigError, RegistryError
from attnlab.probes import PROBES
from attnlab.probes.base import Probe

SRC = Path(__file__).resolve().parents[2] / "src" / "attnlab"
BUILT_IN = {"inflection", "cka", "length_collapse", "head_divergence", "active_dormant", "head_importance",
            "head_overlap", "memory_fidelity", "contrast", "vhd", "carve"}


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(num_heads=4, num_kv_heads=2, layers=2)


def test_every_analysis_is_an_analysis_and_no_probe():
    assert set(ANALYSES.names()) == BUILT_IN
    assert not set(ANALYSES.names()) & set(PROBES.names())
    for name in ANALYSES.names():
        cls = ANALYSES.get(name)
        assert issubclass(cls, Analysis) and not issubclass(cls, Probe), name
        assert cls.name == name
    assert probe_or_analysis("entropy") is PROBES.get("entropy")
    assert probe_or_analysis("cka") is ANALYSES.get("cka")
    with pytest.raises(RegistryError, match="Did you mean: inflection"):
        probe_or_analysis("inflexion")


def test_the_model_runner_implements_the_runner_protocol(llama):
    runner = ModelRunner(llama)
    assert isinstance(runner, Runner)
    assert (runner.facts.num_layers, runner.facts.num_heads, runner.facts.num_kv_heads) == (2, 4, 2)
    assert runner.bos_token_id is None and runner.decode(7) == "7" and runner.vocab_strings() == []
    # every member the protocol lists is documented
    for name, member in vars(Runner).items():
        if callable(member) and not name.startswith("_"):
            assert member.__doc__, name


def test_head_selections_become_edits():
    edits = head_edits({1: torch.tensor([1.0, 0.0, 1.0, 0.5])}, {0: torch.tensor([False, True, False, True])})
    found = [(e.name, tuple(e.layers), tuple(e.heads), e.params()) for e in edits]
    assert found == [("first_key", (0,), (1, 3), {"alpha": 1.0}), ("head_scale", (1,), (1,), {"scale": 0.0}),
                     ("head_scale", (1,), (3,), {"scale": 0.5})]
    assert head_edits({0: torch.ones(4)}, {1: torch.zeros(4, dtype=torch.bool)}) == []  # identities: no edit
    with pytest.raises(ConfigError, match=r"one \(num_heads,\) vector per layer"):
        head_edits({0: torch.ones(2, 4)}, None)


def test_interventions_run_in_a_session_that_checks_the_edits_fired(llama, monkeypatch):
    from attnlab.analyses._ablation import head_effects
    from attnlab.capture.session import Session

    checked = []
    real = Session.check_edits_fired

    def spy(self):
        checked.append([(e.name, tuple(e.layers), tuple(e.heads)) for e in self.edits])
        real(self)

    monkeypatch.setattr(Session, "check_edits_fired", spy)
    batch = {"input_ids": torch.tensor([[5, 9, 11, 3, 17, 21]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    head_effects(ModelRunner(llama), batch, "zero", layers=[1])
    assert checked == [[("head_scale", (1,), (h,))] for h in range(4)]
    checked.clear()
    head_effects(ModelRunner(llama), batch, "first_key", layers=[0])
    assert checked == [[("first_key", (0,), (h,))] for h in range(4)]


def test_an_edit_that_never_fires_fails_the_forward(llama, monkeypatch):
    from attnlab.edits import EDITS
    from attnlab.errors import EditNotFiredError

    edit = EDITS.get("head_scale")(scale=0.0, layers=[1], heads=[0])
    monkeypatch.setattr(type(edit), "applies_to", lambda self, layer: False)  # the edit never sees a call
    batch = {"input_ids": torch.tensor([[5, 9, 11, 3]])}
    with pytest.raises(EditNotFiredError, match="never fired"):
        ModelRunner(llama).forward(batch, edits=[edit])


def test_analyses_import_no_layer_class_and_no_transformers():
    for path in sorted((SRC / "analyses").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith(("transformers", "attnlab.capture")) for a in node.names), path
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            assert not node.module.startswith(("transformers", "attnlab.capture", "attnlab.cli")), path
            if node.module.startswith("attnlab.layers."):
                module = importlib.import_module(node.module)
                classes = [a.name for a in node.names if inspect.isclass(getattr(module, a.name))]
                assert not classes, f"{path.name} imports layer classes {classes}; use attnlab.layers.LAYERS"


def test_ls_probes_lists_probes_and_marked_analyses():
    from attnlab.cli.main import app

    result = CliRunner().invoke(app, ["ls", "probes"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    assert set(PROBES.names()) | BUILT_IN <= set(lines)
    assert all("(analysis)" in lines[name] for name in BUILT_IN)
    assert not any("(analysis)" in lines[name] for name in PROBES.names())


def test_an_analysis_name_in_a_session_is_a_config_error(llama):
    from attnlab.capture.session import Session

    with pytest.raises(ConfigError, match="an analysis"):
        Session(llama, probes=["head_importance"])


@pytest.mark.parametrize("name", ["active_dormant", "head_importance", "head_overlap"])
def test_analysis_layers_read_index_lists_like_edits(name):
    """``layers=0-3`` / ``1+2`` mean the same for an analysis's --probe-arg as for an edit spec."""
    from attnlab.params import build_probes, parse_probe_args

    for text, expected in (("0-3", [0, 1, 2, 3]), ("1+2", [1, 2])):
        (analysis,) = build_probes((name,), parse_probe_args([f"{name}.layers={text}"]))
        assert list(analysis.layers) == expected
