"""Section specs (attnlab.report.sections): plain JSON data, a pure module, keyed by probe and not by statistic."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attnlab.errors import ConfigError
from attnlab.report.io import load_results, write_results
from attnlab.report.render import render_html
from attnlab.report.sections import Section, Series, Text
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


def _heatmap(**series):
    return {"kind": "heatmap", "series": [{"statistic": "entropy", **series}]}


def _curve(**fields):
    return {"kind": "layer_curve", "series": [{"statistic": "entropy"}], **fields}


BAD_SPECS = [
    pytest.param({"id": "a", "title": "A", "parts": 5}, "parts must be a list", id="parts-int"),
    pytest.param({"id": "a", "title": "A", "parts": [{"kind": "text", "template": "a { b"}]}, "template",
                 id="lone-brace"),
    pytest.param({"id": "a", "title": "A", "parts": [{"kind": "text", "template": "a } b"}]}, "template",
                 id="lone-close-brace"),
    pytest.param({"id": "a", "title": "A", "parts": [{"kind": "text", "template": "{mean.x:q}"}]}, "format spec",
                 id="bad-format-spec"),
    pytest.param({"id": "a", "title": "A", "parts": [{"kind": "text", "template": 5}]}, "Text.template",
                 id="template-int"),
    pytest.param({"id": "a", "title": "A", "parts": [{**_curve(), "caption": "{"}]}, "caption", id="caption"),
    pytest.param({"id": "a", "title": "A", "parts": [_heatmap(scale="x")]}, "Series.scale", id="scale-str"),
    pytest.param({"id": "a", "title": "A", "parts": [_heatmap(vmin="z")]}, "Series.vmin", id="vmin-str"),
    pytest.param({"id": "a", "title": "A", "parts": [_heatmap(label="{")]}, "Series.label", id="label-brace"),
    pytest.param({"id": "a", "title": "A", "parts": [_heatmap(dashed="yes")]}, "Series.dashed", id="dashed-str"),
    pytest.param({"id": "a", "title": "A", "parts": [_curve(ylim=[0, 1, 2])]}, "ylim", id="ylim-3"),
    pytest.param({"id": "a", "title": "A", "parts": [_curve(ylim=5)]}, "ylim", id="ylim-int"),
    pytest.param({"id": "a", "title": "A", "parts": [_curve(series=5)]}, "layer_curve", id="series-int"),
    pytest.param({"id": "a", "title": "A", "parts": [{"kind": "table", "columns": [{"key": "k", "header": 1}]}]},
                 "Column.header", id="column-header-int"),
    pytest.param({"id": "a", "title": "A", "parts": [{"kind": "table", "columns": [], "top": "3"}]}, "Table.top",
                 id="top-str"),
]


@pytest.mark.parametrize(("data", "match"), BAD_SPECS)
def test_bad_field_types_and_templates_are_one_line_config_errors(data, match):
    with pytest.raises(ConfigError, match=match) as info:
        Section.from_dict(data)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("data", "match"), BAD_SPECS)
def test_render_cli_exits_2_with_one_line_on_bad_section_specs(tmp_path, fake_results, data, match):
    from typer.testing import CliRunner

    from attnlab.cli.main import app

    fake_results["sections"] = {"entropy": [data]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(fake_results), encoding="utf-8")
    result = CliRunner().invoke(app, ["render", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], result.output


def test_constructed_primitives_check_their_field_types():
    with pytest.raises(ConfigError, match="Series.scale must be float"):
        Series("x", scale="2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="Text.template is not a valid template"):
        Text("{oops")
    assert Series("x", scale=100, vmin=0).scale == 100  # ints are floats


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


def test_integer_format_spec_on_a_float_falls_back_to_display():
    rows = [_row("p", "x", 0.25, layer=0, head=0)]
    results = {"schema_version": 2, "command": "probe", "model": {"name": "m", "num_layers": 1}, "rows": rows,
               "sections": {"p": [{"id": "p", "title": "P", "parts": [{"kind": "text", "template": "m={mean.x:d}"}]}]}}
    assert "m=0.25" in render_html(results)


def test_probe_and_analysis_bases_declare_no_sections():
    from attnlab.analyses.base import Analysis
    from attnlab.probes.base import Probe
    from attnlab.report.sections import section_specs

    assert Probe.sections == () and Analysis.sections == ()

    class Quiet(Probe):
        name = "quiet"

    assert section_specs([Quiet(), Quiet]) == {"quiet": []}
