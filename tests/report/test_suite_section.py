"""The probe-suite sections of report.html: present exactly for the suite probes that ran."""

from __future__ import annotations

from attnlab.report.draw import probe_sections
from attnlab.report.render import render_html
from attnlab.report.upgrade import declared_sections


def _results(rows, extras=None):
    probes = list(dict.fromkeys([row["probe"] for row in rows] + list(extras or {})))
    return {"schema_version": 2, "command": "probe", "model": {"name": "m", "num_layers": 2, "num_heads": 2},
            "rows": rows, "extras": extras or {}, "sections": declared_sections(probes)}


def _row(probe, statistic, value, layer=None, head=None, position=None):
    return {"probe": probe, "variant": None, "statistic": statistic, "layer": layer, "head": head,
            "position": position, "value": value}


def test_sections_only_for_probes_that_ran():
    rows = [_row("inflection", stat, 1.0 + layer, layer) for layer in range(2)
            for stat in ("attention_entropy", "activation_grad_norm", "param_grad_norm")]
    rows += [_row("head_importance", "importance", 0.1 * (layer + head), layer, head) for layer in range(2)
             for head in range(2)]
    extras = {"inflection": {"band": [1], "rule": "stated"},
              "head_importance": {"top_heads": [{"layer": 1, "head": 1, "importance": 0.2}]}}
    sections = probe_sections(_results(rows, extras))
    assert [s["probe"] for s in sections] == ["inflection", "head_importance"]
    html = render_html(_results(rows, extras))
    assert 'id="probe-inflection"' in html and 'id="probe-head-importance"' in html
    assert 'id="probe-cka"' not in html
    assert "Inflection band: layer(s) 1" in html


def test_every_registered_probe_and_analysis_declares_a_section():
    from attnlab.analyses import ANALYSES
    from attnlab.probes import PROBES

    found = {name: registry.get(name).sections for registry in (PROBES, ANALYSES) for name in registry.names()}
    assert found and all(found.values()), [name for name, sections in found.items() if not sections]
    ids = [section.id for sections in found.values() for section in sections]
    assert len(ids) == len(set(ids)), ids


def test_no_suite_section_without_suite_rows():
    assert [s["probe"] for s in probe_sections(_results([_row("entropy", "entropy", 1.0, 0, 0)]))] == ["entropy"]
