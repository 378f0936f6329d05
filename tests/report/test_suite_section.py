"""The probe-suite sections of report.html: present exactly for the suite probes that ran."""

from __future__ import annotations

from attnlab.report.render import render_html
from attnlab.report.suite_section import SECTIONS, suite_sections


def _results(rows, extras=None):
    return {"schema_version": 1, "command": "probe", "model": {"name": "m", "num_layers": 2, "num_heads": 2},
            "rows": rows, "extras": extras or {}}


def _row(probe, statistic, value, layer=None, head=None, position=None):
    return {"probe": probe, "statistic": statistic, "layer": layer, "head": head, "position": position,
            "value": value}


def test_sections_only_for_probes_that_ran():
    rows = [_row("inflection", stat, 1.0 + layer, layer) for layer in range(2)
            for stat in ("attention_entropy", "activation_grad_norm", "param_grad_norm")]
    rows += [_row("head_importance", "importance", 0.1 * (layer + head), layer, head) for layer in range(2)
             for head in range(2)]
    extras = {"inflection": {"band": [1], "rule": "stated"},
              "head_importance": {"top_heads": [{"layer": 1, "head": 1, "importance": 0.2}]}}
    sections = suite_sections(_results(rows, extras))
    assert [s["probe"] for s in sections] == ["inflection", "head_importance"]
    html = render_html(_results(rows, extras))
    assert 'id="probe-inflection"' in html and 'id="probe-head-importance"' in html
    assert 'id="probe-cka"' not in html
    assert "Inflection band: layer(s) 1" in html


def test_every_registered_suite_probe_has_a_section_builder():
    from attnlab.analyses import ANALYSES
    from attnlab.probes import PROBES

    base = {"entropy", "sink", "distance", "norms"}  # the report's own sections; every other probe is a suite probe
    assert (set(PROBES.names()) | set(ANALYSES.names())) - base == set(SECTIONS)


def test_no_suite_section_without_suite_rows():
    assert suite_sections(_results([_row("entropy", "entropy", 1.0, 0, 0)])) == []
