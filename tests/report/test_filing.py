"""Issue 12 finding 3: sections are filed by probe, never by statistic name, and a section without data is left out.

A regression guard: main already files sections by probe (probes declare their sections; results.json stores them
per probe), so these tests pass there too.

The reports come from real runs of ``attnlab eval`` and ``attnlab probe`` on a tiny random Llama (tests/tiny_models),
so the results dicts have exactly the shape the commands write: ``--search zerotuning`` rows carry the statistic
``entropy`` (output entropy) under probe ``search_zerotuning``; rope_decay rows carry ``mean_attention``, a
statistic name the distance probe also uses. Each report is also re-rendered from its results.json with the
``sections`` key removed and as schema 1 (files written before sections were stored), where the sections come from
the probe registry.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.report.render import render_html
from cli.helpers import tiny_model_and_text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """results.json and report.html of an eval with --search zerotuning and of a rope_decay probe run."""
    root = tmp_path_factory.mktemp("filing")
    model, text = tiny_model_and_text(root, name="tiny", words=400, stride=7)
    model = str(model)
    common = ["--model", model, "--text", str(text), "--seq-len", "24"]
    commands = {
        "eval": ["eval", *common, "--max-windows", "4", "--search", "zerotuning", "--task", "next_token"],
        "probe": ["probe", *common, "--max-windows", "2", "--bos", "never", "--probe", "rope_decay"],
    }
    out = {}
    for name, args in commands.items():
        result = CliRunner().invoke(app, [*args, "--out", str(root / name)])
        assert result.exit_code == 0, result.output
        out[name] = (json.loads((root / name / "results.json").read_text(encoding="utf-8")),
                     (root / name / "report.html").read_text(encoding="utf-8"))
    return out


def _ids(html: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', html)


def _older(results: dict, how: str) -> dict:
    """``results`` as an older file: without ``sections`` (``"no-sections"``) or in schema 1 (``"v1"``)."""
    older = copy.deepcopy(results)
    if how in ("no-sections", "v1"):
        older.pop("sections")
    if how == "v1":
        older["schema_version"] = 1
        for row in older["rows"]:
            variant = row.pop("variant")
            if variant is not None:
                row["probe"] = f"{row['probe']}@{variant}"
    return older


@pytest.mark.parametrize("how", ["as-written", "no-sections", "v1"])
def test_a_zerotuning_search_report_has_no_attention_entropy_section(runs, how):
    results, written = runs["eval"]
    assert {("search_zerotuning", "entropy")} <= {(r["probe"], r["statistic"]) for r in results["rows"]}
    html = written if how == "as-written" else render_html(_older(results, how))
    assert _ids(html) == ["run", "eval", "tokens", "tables"]
    assert "Attention entropy" not in html and 'href="#entropy"' not in html
    assert "Search: zerotuning" in html


@pytest.mark.parametrize("how", ["as-written", "no-sections", "v1"])
def test_a_rope_decay_report_draws_its_own_section_not_attention_vs_distance(runs, how):
    results, written = runs["probe"]
    assert {r["statistic"] for r in results["rows"]} >= {"mean_attention", "rope_bound"}
    html = written if how == "as-written" else render_html(_older(results, how))
    assert _ids(html) == ["run", "probe-rope-decay", "patterns", "tokens", "tables"]
    assert "Attention vs distance" not in html and "power law" not in html.lower()
    section = re.search(r'<section id="probe-rope-decay">(.*?)</section>', html, re.S).group(1)
    assert section.count("<figure>") == 2 and "<table>" not in section  # figures drawn, no empty fit table
    assert "rope_theta = 10000" in section


@pytest.mark.parametrize("name", ["eval", "probe"])
def test_eval_and_probe_reports_show_no_not_run_sections(runs, name):
    results, html = runs[name]
    assert "Not run" not in html
    assert "wrote no rows this section can draw" not in html
    assert "Not run" not in render_html(_older(results, "v1"))
