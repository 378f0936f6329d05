"""A bad ``--edit`` fails right after the model loads, before the baseline (or any window) runs."""

from __future__ import annotations

import re

import pytest
from tiny_models import tiny_llama, tiny_tokenizer
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.errors import ConfigError
from attnlab.evaluation import EvalConfig, run_eval
from cli.helpers import assert_one_line_error, tiny_model_and_text

BAD = [
    ("head_patch:layers=1", "head_patch needs recorded head outputs"),
    ("mean_ablation:source=recorded", "mean_ablation:source=recorded needs recorded means"),
    ("mean_ablation:layers=50", "layers=[50] but the model has"),
    ("temperature:tau=0.9+head_scale:scale=0,heads=9", "heads=[9] but the model has"),
]


@pytest.mark.parametrize(("spec", "fragment"), BAD)
def test_run_eval_rejects_a_bad_edit_before_any_window(spec, fragment):
    messages: list[str] = []
    config = EvalConfig(seq_len=16, max_windows=2, variants=("temperature:tau=0.9", spec))
    with pytest.raises(ConfigError, match=re.escape(fragment)) as caught:
        run_eval(config, model=tiny_llama(), tokenizer=tiny_tokenizer(),
                 progress=lambda done, total, message: messages.append(message))
    assert str(caught.value).startswith(f"--edit {spec!r}: ") and "\n" not in str(caught.value)
    assert not any("windows" in m or "passkey" in m or "reading text" in m for m in messages), messages


def test_cli_eval_bad_edit_exits_2_with_one_line_and_no_baseline(tmp_path):
    model, text = tiny_model_and_text(tmp_path)
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--text", str(text), "--seq-len", "16",
                                      "--max-windows", "2", "--edit", "mean_ablation:layers=50",
                                      "--out", str(tmp_path / "out")])
    assert_one_line_error(result, 2, "--edit 'mean_ablation:layers=50'", "layers=[50]")
    assert "baseline" not in result.output
    assert not (tmp_path / "out").exists()


def _resolve(dotted):
    """The object a dotted ``attnlab....`` path names (importing its longest module prefix)."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return target
    raise ImportError(dotted)


@pytest.mark.parametrize(("spec", "calls"), [
    ("head_patch:layers=1", ["attnlab.edits.head_patch.HeadPatch.from_source", "attnlab.record_head_outputs"]),
    ("mean_ablation:source=recorded", ["attnlab.edits.mean_ablation.MeanAblation.from_means",
                                        "attnlab.record_head_means"]),
])
def test_python_only_messages_name_importable_paths(spec, calls):
    from attnlab.edits import parse_edit_spec

    with pytest.raises(ConfigError) as caught:
        parse_edit_spec(spec).check_model(2, 4)
    message = str(caught.value)
    named = re.findall(r"attnlab(?:\.\w+)+(?=\()", message)
    assert named == calls, message
    for dotted in named:
        assert callable(_resolve(dotted)), dotted
