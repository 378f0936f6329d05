"""Adding a probe is one module: a probe defined here declares its section and it appears in report.html.

Nothing under ``attnlab/report`` knows this probe; its section travels in results.json (``results["sections"]``),
so the report is drawn from the JSON alone. The first tests run it in a Session without registering it (so no
registry can supply its section); the last registers it with ``PROBES.register`` and runs ``attnlab probe
--probe test_call_count`` end to end, the way a plug-in author would.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from attnlab.capture.session import Session
from attnlab.columns import SCHEMA_VERSION
from attnlab.probes import PROBES
from attnlab.probes.base import Probe
from attnlab.report.io import load_results, write_results
from attnlab.report.render import render_html
from attnlab.report.sections import Column, Heatmap, Section, Series, Table, Text, section_specs
from attnlab.cli.main import app
from tests.tiny_models import WORDS, save_model_dir, tiny_llama


class CallCountProbe(Probe):
    """Counts the attention calls each (layer, query head) sees: the smallest probe with rows, extras and a section."""

    name = "test_call_count"
    needs = frozenset({"probs"})  # the session then calls begin_call for every attention call

    sections = (Section("probe-test-call-count", "Calls per head (test probe)", (
        Text(template="The model made {calls} attention calls."),
        Heatmap((Series("calls", "calls per head", "attention calls"),), alt="Heatmap of calls per layer and head",
                caption="Attention calls per layer (rows) and query head (columns)."),
        Table((Column("layer", "layer"), Column("calls", "calls")), extras="per_layer", title="Calls per layer",
              caption="One row per layer, {shown} of {total}."),
    )),)

    def __init__(self) -> None:
        self.counts: Counter[tuple[int, int]] = Counter()
        self.calls = 0

    def begin_call(self, call: Any) -> None:
        self.calls += 1
        for head in range(call.num_heads):
            self.counts[(call.layer_idx, head)] += 1

    def rows(self) -> list[dict[str, Any]]:
        return [{"probe": self.name, "statistic": "calls", "layer": layer, "head": head, "position": None,
                 "value": float(count)} for (layer, head), count in sorted(self.counts.items())]

    def extras(self, decode: Any = None) -> dict[str, Any]:
        per_layer = Counter(layer for layer, head in self.counts if head == 0)
        return {"calls": self.calls, "per_layer": [{"layer": layer, "calls": self.counts[(layer, 0)]}
                                                   for layer in sorted(per_layer)]}


def _section(html: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', html, re.S)
    assert match, f"section {section_id} missing"
    return match.group(1)


def test_a_probe_defined_in_a_test_gets_its_section(tmp_path):
    probe = CallCountProbe()
    assert probe.name not in PROBES
    model = tiny_llama(layers=2, num_heads=4, num_kv_heads=2)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with Session(model, probes=[probe]), torch.no_grad():
        model(input_ids=ids)
        model(input_ids=ids[:1])
    results = {"schema_version": SCHEMA_VERSION, "command": "probe",
               "model": {"name": "tiny-llama", "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
               "rows": probe.rows(), "extras": {probe.name: probe.extras()}, "sections": section_specs([probe])}
    paths = write_results(tmp_path, results)

    html = render_html(load_results(tmp_path))  # `attnlab render results.json`: the JSON alone
    assert html == paths["html"].read_text(encoding="utf-8")
    assert html.count('id="probe-test-call-count"') == 1 and 'href="#probe-test-call-count"' in html
    section = _section(html, "probe-test-call-count")
    assert "Calls per head (test probe)" in section and "<code>test_call_count</code>" in section
    assert "The model made 4 attention calls." in section  # 2 forward passes × 2 layers
    assert re.search(r'<img src="data:image/png;base64,[^"]+" alt="Heatmap of calls per layer and head">', section)
    assert "Attention calls per layer (rows) and query head (columns)." in section
    assert "<h3>Calls per layer</h3>" in section and "One row per layer, 2 of 2." in section
    cells = re.findall(r'<td class="num">(\d+)</td><td class="num">(\d+)</td>', section)
    assert cells == [("0", "2"), ("1", "2")]
    for other in ("sinks", "entropy", "distance", "norms", "probe-magnets"):
        assert f'id="{other}"' not in html, other


def test_without_its_spec_the_probe_draws_nothing(tmp_path):
    """The honest counterpart: the section comes from the spec in the JSON, not from the rows."""
    probe = CallCountProbe()
    probe.calls, probe.counts[(0, 0)] = 1, 1
    results = {"schema_version": SCHEMA_VERSION, "command": "probe", "model": {"name": "m"},
               "rows": probe.rows(), "extras": {probe.name: probe.extras()}}
    html = render_html(results)
    assert 'id="probe-test-call-count"' not in html and "test_call_count" in html  # still in the tables


@pytest.fixture
def registered():
    """CallCountProbe registered as ``test_call_count`` for one test; always unregistered afterwards."""
    assert "test_call_count" not in PROBES
    PROBES.register("test_call_count")(CallCountProbe)
    try:
        yield CallCountProbe
    finally:
        PROBES.unregister("test_call_count")


def test_a_registered_test_probe_runs_through_the_cli(registered, tmp_path):
    model_dir = save_model_dir(tmp_path / "tiny-llama", tiny_llama(layers=2, num_heads=4, num_kv_heads=2))
    text = tmp_path / "words.txt"
    text.write_text(" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(200)), encoding="utf-8")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["probe", "--model", str(model_dir), "--probe", "test_call_count",
                                      "--seq-len", "16", "--max-windows", "1", "--text", str(text),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {row["probe"] for row in load_results(out)["rows"]} == {"test_call_count"}
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count('id="probe-test-call-count"') == 1 and 'href="#probe-test-call-count"' in html
    section = _section(html, "probe-test-call-count")
    assert "Calls per head (test probe)" in section and "<code>test_call_count</code>" in section
    assert "The model made 2 attention calls." in section  # 1 window × 2 layers
    assert re.search(r'<img src="data:image/png;base64,[^"]+" alt="Heatmap of calls per layer and head">', section)
    assert "<h3>Calls per layer</h3>" in section and "One row per layer, 2 of 2." in section


def test_the_registration_fixture_cleaned_up():
    assert "test_call_count" not in PROBES
