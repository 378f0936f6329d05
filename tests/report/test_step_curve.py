"""StepCurve: statistics against the training step (rows with a ``step`` key), drawn by the generic renderer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from attnlab.errors import ConfigError
from attnlab.report import draw
from attnlab.report.io import load_results, write_results
from attnlab.report.render import render_html
from attnlab.report.sections import Section, Series, StepCurve

STEPS = (0, 5, 10)


def _rows():
    """sink_rate per layer (2 heads-worth of rows each) and an overall loss, at three steps; values made up."""
    rows = []
    for step in STEPS:
        rows.append({"probe": "train", "variant": None, "statistic": "eval_loss", "layer": None, "head": None,
                     "position": None, "value": 3.0 / (1 + step), "step": step})
        for layer in range(2):
            for head in range(2):
                rows.append({"probe": "train", "variant": None, "statistic": "entropy", "layer": layer,
                             "head": head, "position": None, "value": 0.1 * step + layer + 0.5 * head,
                             "step": step})
    rows.append({"probe": "train", "variant": None, "statistic": "entropy", "layer": 0, "head": 0,
                 "position": None, "value": 99.0})  # no step: not on a step curve
    return rows


SECTION = Section("training", "Training", (
    StepCurve((Series("eval_loss", "eval loss", layers="none"),), title="loss", ylabel="nats", logy=True),
    StepCurve((Series("entropy", "layer {layer}", layers="each"),), title="entropy per layer"),
    StepCurve((Series("entropy", "all layers"),), title="entropy overall"),
))


def _results():
    return {"schema_version": 2, "command": "train", "model": {"name": "tiny", "num_layers": 2}, "rows": _rows(),
            "sections": {"train": [SECTION.to_dict()]}}


def test_step_curve_round_trips_through_json():
    assert Section.from_dict(json.loads(json.dumps(SECTION.to_dict()))) == SECTION


def test_step_curve_checks_its_fields():
    with pytest.raises(ConfigError, match="StepCurve.logy"):
        StepCurve((Series("x"),), logy="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown field"):
        Section.from_dict({"id": "a", "title": "A", "parts": [{"kind": "step_curve", "series": [], "logx": True}]})


def test_step_curve_lines_are_the_means_per_step(monkeypatch):
    panels = []
    monkeypatch.setattr(draw.plots, "lines_figure", lambda p, height=3.4: panels.extend(p) or "data:image/png;x")
    html = render_html(_results())
    assert 'id="training"' in html and html.count("data:image/png;x") == 3
    loss, per_layer, overall = panels
    assert loss.logy and [line.label for line in loss.series] == ["eval loss"]
    np.testing.assert_array_equal(loss.series[0].x, STEPS)
    np.testing.assert_allclose(loss.series[0].y, [3.0 / (1 + s) for s in STEPS])
    assert [line.label for line in per_layer.series] == ["layer 0", "layer 1"]
    for layer, line in enumerate(per_layer.series):  # mean over the two heads: 0.1 step + layer + 0.25
        np.testing.assert_allclose(line.y, [0.1 * s + layer + 0.25 for s in STEPS])
    np.testing.assert_allclose(overall.series[0].y, [0.1 * s + 0.75 for s in STEPS])  # the step-less row is out
    assert per_layer.xlabel == "step"


def test_step_curve_without_step_rows_draws_nothing():
    results = _results()
    results["rows"] = [{k: v for k, v in row.items() if k != "step"} for row in results["rows"]]
    html = render_html(results)
    assert 'id="training"' in html and "data:image/png" not in html.split('id="training"')[1].split("</section>")[0]


def test_results_csv_keeps_the_step_column(tmp_path):
    write_results(tmp_path, _results())
    lines = (tmp_path / "results.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "probe,variant,statistic,layer,head,position,value,step"
    assert lines[1] == "train,,eval_loss,,,,3.0,0"
    assert lines[-1].endswith(",99.0,")  # a row without a step: empty cell
    loaded = load_results(tmp_path)
    assert [row.get("step") for row in loaded["rows"][:2]] == [0, 0]
    assert 'id="training"' in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_results_csv_of_a_run_without_steps_has_no_step_column(tmp_path, fake_results):
    write_results(tmp_path, fake_results)
    header = (tmp_path / "results.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "probe,variant,statistic,layer,head,position,value"
