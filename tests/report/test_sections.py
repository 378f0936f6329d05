"""Section specs (attnlab.report.sections): plain JSON data, a pure module, keyed by probe and not by statistic."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attnlab.errors import ConfigError
from attnlab.report.io import load_results, write_results
from attnlab.report.render import render_html
from attnlab.report.sections import Section, Series
from attnlab.report.upgrade import declared_sections


def _registered_sections():
    from attnlab.analyses import ANALYSES
    from attnlab.probes import PROBES

    return [section for registry in (PROBES, ANALYSES) for name in registry.names()
            for section in registry.get(name).sections]


def test_every_declared_section_round_trips_through_json():
    sections = _registered_sections()
    assert len(sections) >= 17
    for section in sections:
        assert Section.from_dict(json.loads(json.dumps(section.to_dict()))) == section


def test_sections_module_imports_no_torch_or_matplotlib():
    code = ("import sys, attnlab.report.sections; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        pytest.param({"id": "a", "title": "A", "parts": [{"kind": "pie"}]}, "kind in", id="unknown-kind"),
        pytest.param({"id": "a", "parts": []}, "needs id, title and parts", id="no-title"),
        pytest.param({"id": "a", "title": "A", "parts": [{"kind": "text", "template": "x", "colour": 1}]},
                     "unknown field", id="unknown-field"),
        pytest.param({"id": "a", "title": "A", "parts": [{"kind": "heatmap", "series": [{"stat": "x"}]}]},
                     "heatmap", id="bad-series"),
    ],
)
def test_bad_section_dicts_are_one_line_config_errors(data, match):
    with pytest.raises(ConfigError, match=match) as info:
        Section.from_dict(data)
    assert "\n" not in str(info.value)


def test_series_rejects_unknown_layer_choice():
    with pytest.raises(ConfigError, match="layers must be one of"):
        Series("x", layers="some")


def _row(probe, statistic, value, layer=None, head=None, position=None, variant=None):
    return {"probe": probe, "variant": variant, "statistic": statistic, "layer": layer, "head": head,
            "position": position, "value": value}


def test_search_entropy_rows_are_not_the_entropy_probe():
    rows = [_row("search_zerotuning", stat, 1.0, variant=label) for label in ("baseline", "supervised")
            for stat in ("perplexity", "accuracy", "entropy")]
    html = render_html({"schema_version": 2, "command": "eval", "model": {"name": "m"}, "rows": rows})
    assert 'id="entropy"' not in html and "Attention entropy" not in html


def test_rope_decay_rows_are_not_drawn_as_the_distance_probe():
    rows = [_row("rope_decay", "rope_bound", 1.0 / (1 + d), position=d) for d in range(8)]
    rows += [_row("rope_decay", "mean_attention", 0.5 / (1 + d), layer=layer, position=d)
             for layer in range(2) for d in range(8)]
    results = {"schema_version": 2, "command": "probe", "model": {"name": "m", "num_layers": 2}, "rows": rows,
               "extras": {"rope_decay": {"rope_theta": 10000.0, "head_dim": 8, "exclude_first": True}},
               "sections": declared_sections(["rope_decay"])}
    html = render_html(results)
    assert 'id="distance"' not in html and "Attention vs distance" not in html
    assert 'id="probe-rope-decay"' in html and "rope_theta = 10000" in html


def test_a_v1_eval_file_is_split_into_probe_and_variant(tmp_path):
    rows = [{"probe": f"perplexity@{label}", "statistic": "perplexity", "layer": None, "head": None,
             "position": None, "value": value} for label, value in (("baseline", 20.0), ("temperature:tau=0.9", 21.0))]
    (tmp_path / "results.json").write_text(json.dumps(
        {"schema_version": 1, "command": "eval", "model": {"name": "m"}, "rows": rows}), encoding="utf-8")
    loaded = load_results(tmp_path)
    assert loaded["schema_version"] == 2 and loaded["upgraded_from"] == 1
    assert [(r["probe"], r["variant"]) for r in loaded["rows"]] == [("perplexity", "baseline"),
                                                                   ("perplexity", "temperature:tau=0.9")]
    assert loaded["sections"] == {}
    out = tmp_path / "out"
    write_results(out, loaded)
    lines = (out / "results.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "probe,variant,statistic,layer,head,position,value"
    assert lines[2] == "perplexity,temperature:tau=0.9,perplexity,,,,21.0"
