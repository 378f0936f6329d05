"""The report's Eval section: present only for eval runs; baseline vs variants, deltas, passkey plots, search."""

from __future__ import annotations

import math

from attnlab.report.eval_section import eval_section, split_probe
from attnlab.report.io import load_results, write_results
from attnlab.report.render import render_html


def _variant(label, ppl, acc, passkey):
    return {"label": label, "edit_report": [] if label == "baseline" else [
        {"edit": "sink_window", "calls_touched": 4, "heads_touched": 8, "max_change": 0.25}],
        "perplexity": ppl, "next_token_accuracy": acc, "tokens_scored": 100, "seconds": 1.0,
        "passkey": {"accuracy": passkey, "cells": [{"length": 64, "depth": d, "accuracy": passkey, "trials": 2}
                                                   for d in (0.0, 1.0)],
                    "by_length": [{"length": 64, "accuracy": passkey, "trials": 4}]}}


def _results(search=None):
    rows = []
    for label, base in (("baseline", 3.0), ("sink_window:sinks=4,window=252", 3.5)):
        rows += [{"probe": f"perplexity@{label}", "statistic": "nll_by_position", "layer": None, "head": None,
                  "position": p, "value": base + p / 100} for p in (0, 16, 32)]
    return {"schema_version": 1, "command": "eval", "model": {"name": "tiny"}, "rows": rows, "eval": {
        "seq_len": 48, "stride": 48, "num_windows": 2, "position_bin": 16, "definitions": {"perplexity": "exp"},
        "passkey": {"lengths": [64], "depths": [0.0, 1.0], "trials_per_cell": 2},
        "variants": [_variant("baseline", 20.0, 0.25, 1.0), _variant("sink_window:sinks=4,window=252", 22.0, 0.2, 0.5)],
        **({"search": search} if search else {})}}


def test_split_probe():
    assert split_probe("perplexity@sink_window:sinks=4,window=252") == ("perplexity", "sink_window:sinks=4,window=252")
    assert split_probe("entropy") == ("entropy", None)


def test_table_has_deltas_against_the_baseline():
    section = eval_section(_results())
    base, edited = section["table"]
    assert base["perplexity_delta"] == "+0.00 %" and edited["perplexity_delta"] == "+10.00 %"
    assert edited["accuracy_delta"] == "-0.0500" and edited["passkey_delta"] == "-0.5000"
    assert "sink_window: 4 calls, 8 heads" in edited["edits"]
    assert section["position_figure"].startswith("data:image/png;base64,")
    assert len(section["passkey"]["figures"]) == 1


def test_eval_section_renders_and_round_trips(tmp_path):
    search = {"kind": "zerotuning", "validation_windows": [0], "test_windows": [1],
              "grid": [{"gamma": g, "perplexity": 20 + g, "accuracy": 0.2, "entropy": 3.0} for g in (0.5, 1.0)],
              "supervised": {"criterion": "accuracy", "gamma": 0.5}, "unsupervised": {"gamma": 1.0},
              "test": {"baseline": {"perplexity": 20.0, "accuracy": 0.2, "entropy": 3.0}}}
    paths = write_results(tmp_path, _results(search))
    html = paths["html"].read_text()
    for fragment in ('id="eval"', 'href="#eval"', "Passkey retrieval", "Search: zerotuning", "+10.00 %"):
        assert fragment in html, fragment
    assert render_html(load_results(tmp_path)) == html


def test_probe_reports_have_no_eval_section():
    results = {"schema_version": 1, "command": "report", "model": {}, "rows": []}
    assert eval_section(results) is None
    assert 'id="eval"' not in render_html(results)


def test_missing_values_show_a_dash():
    results = _results()
    results["eval"]["variants"][1]["perplexity"] = math.nan
    assert eval_section(results)["table"][1]["perplexity_delta"] == "—"


def test_passkey_caption_says_edits_act_per_decode_step(tmp_path):
    paths = write_results(tmp_path, _results())
    html = paths["html"].read_text(encoding="utf-8")
    assert "acts per decode step on that row only" in html
