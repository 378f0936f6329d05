"""The results dicts of application runs (docs/results.md): one run (``command: "app train"``) and a comparison of
variants (``command: "app compare"``).

Rows: probe ``app`` holds the run's log, ``{split}_{statistic}`` (``train_loss``, ``train_lr``, ``eval_loss``,
``eval_<metric>`` for every metric of the app) with the ``step`` key and an empty layer/head/position; every probe
run at an evaluation keeps its usual rows; every row carries ``step`` and ``variant`` (a probe's "layer" is an
attention site of the model). Sections: loss and the headline metric against the step, sinks and entropy over
training (one run); the variants table (a comparison), from ``extras["compare"]["variants"]``. The probes' own
sections are left out: they average over every row, so they would mix steps (and variants).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

from attnlab import __version__
from attnlab.columns import SCHEMA_VERSION
from attnlab.lab.train_results import TRAINING_SECTIONS, versions
from attnlab.report.sections import Column, Section, Series, StepCurve, Table, Text

__all__ = ["app_results", "compare_results", "summary_row"]

SUMMARY = {"entropy": "entropy", "sink": "sink_rate", "distance": "power_law_exponent"}
"""Probe → the statistic a comparison shows: its mean over the rows of the app's summary sites
(:meth:`attnlab.lab.apps.base.App.summary_sites`; all by default) at the last evaluation."""


def _no_probe_sections(probes: Any) -> dict[str, list[dict[str, Any]]]:
    """An empty section list for every probe: their own sections average over every row, which here spans steps
    (and variants), so a figure would mix the untrained model with the trained one."""
    return {name: [] for name in probes}


def _run_sections(app: Any, probes: Any) -> dict[str, list[dict[str, Any]]]:
    headline = app.headline
    parts = (
        Text(template="{app} ({variant}: {variant_description}), layer {layer}: {num_parameters} parameters, "
                      "{steps} steps in {seconds} s; last evaluation: {final_text}."),
        StepCurve((Series("train_loss", "train", layers="none"), Series("eval_loss", "eval", layers="none")),
                  title="Loss", ylabel="training loss", logy=True),
        StepCurve((Series(f"eval_{headline}", headline, layers="none"),), title=f"Headline metric: {headline}",
                  ylabel=headline, caption="Averaged over the eval batches at each evaluation."),
    )
    sections = {**_no_probe_sections(probes), "app": [Section("app-training", "Training", parts).to_dict()]}
    for name in ("sink", "entropy"):  # curves over steps, as in attnlab train
        if name in probes:
            sections[name] = [s.to_dict() for s in TRAINING_SECTIONS[name]]
    return sections


def _model_record(model: Any, name: str, source: str) -> dict[str, Any]:
    from attnlab.capture.architectures import model_facts

    return {**model_facts(model, name=name, source=source).to_dict(), "loaded_from": source, "requested": name}


def _envelope(command: str, config: dict[str, Any], model: dict[str, Any], rows: list[dict[str, Any]],
              paths: Mapping[int, str], extras: dict[str, Any], sections: dict[str, Any],
              seconds: float) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION, "attnlab_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
        "config": config, "model": model, "tokenizer": None, "seed": config["seed"], "versions": versions(),
        "attention_paths": {str(layer): path for layer, path in sorted(paths.items())}, "windows": [],
        "rows": rows, "extras": extras, "sections": sections, "timing": {"seconds": round(seconds, 3)},
    }


def _log_rows(log: list[dict[str, Any]], variant: str) -> list[dict[str, Any]]:
    return [{"probe": "app", "variant": variant, "statistic": f"{row['split']}_{row['statistic']}", "layer": None,
             "head": None, "position": None, "value": row["value"], "step": row["step"]} for row in log]


def app_results(config: Any, app: Any, model: Any, data: Any, *, log: list[dict[str, Any]],
                probe_rows: list[dict[str, Any]], paths: Mapping[int, str], num_parameters: int, seconds: float,
                final: Mapping[str, float]) -> dict[str, Any]:
    """The results dict of one :func:`attnlab.lab.apps.train.train_app` run."""
    name = f"{app.name} (variant {app.variant})"
    source = "trained by attnlab app train" + (f" in {config.out}" if config.out else " (not saved)")
    shown = ", ".join(f"{key} {value:.4g}" for key, value in final.items())
    extras = {"app": {**config.to_dict(), **app.describe(), "data": data.describe(), "final": dict(final),
                      "final_text": shown, "num_parameters": num_parameters, "seconds": round(seconds, 1)}}
    rows = _log_rows(log, app.variant) + list(probe_rows)
    return _envelope("app train", config.to_dict(), _model_record(model, name, source), rows, paths, extras,
                     _run_sections(app, config.probes), seconds)


def summary_row(run: Any) -> dict[str, Any]:
    """One comparison row: variant, final metrics, each probe's :data:`SUMMARY` statistic at the last evaluation
    (mean over the app's summary sites and their heads), parameters and seconds."""
    last = max((row["step"] for row in run.probe_rows), default=None)
    sites = run.config.make_app().summary_sites()
    row: dict[str, Any] = {"variant": run.config.variant, **run.final}
    for probe, statistic in SUMMARY.items():
        values = [r["value"] for r in run.probe_rows if r["probe"] == probe and r["statistic"] == statistic
                  and r["step"] == last and r["layer"] is not None and (sites is None or r["layer"] in sites)
                  and r["value"] is not None and not math.isnan(r["value"])]
        if probe in run.config.probes:
            row[statistic] = sum(values) / len(values) if values else math.nan
    row.update(num_parameters=run.num_parameters, seconds=round(run.seconds, 1))
    return row


def compare_results(config: Any, runs: Mapping[str, Any], table: list[dict[str, Any]]) -> dict[str, Any]:
    """The results dict of :func:`attnlab.lab.apps.train.compare_variants`: every run's rows (log rows tagged with
    their variant) and the variants table as a section."""
    first = next(iter(runs.values()))
    app = first.config.make_app()
    rows: list[dict[str, Any]] = []
    for variant, run in runs.items():
        rows += _log_rows(run.log, variant) + list(run.probe_rows)
    keys = [key for key in table[0] if key != "variant"] if table else []
    columns = (Column("variant", "variant", format="text"),) + tuple(Column(key, key) for key in keys)
    better = "higher" if app.higher_is_better else "lower"
    sites = app.summary_sites()
    over = "attention sites" if sites is None else f"the app's summary sites ({', '.join(map(str, sites))})"
    section = Section("app-compare", "Variants compared", (
        Text(template=f"{app.name}: every variant trained with the same seed, data and settings; the headline "
                      f"metric is {app.headline} ({better} is better). Probe columns are means over {over} and "
                      "their heads at the last evaluation."),
        Table(columns, extras="variants", title="Final evaluation"),
    ))
    extras = {"compare": {"app": app.name, "headline": app.headline, "higher_is_better": app.higher_is_better,
                          "summary_sites": None if sites is None else list(sites), "variants": table,
                          "descriptions": {v: type(app).variants[v] for v in runs}}}
    seconds = sum(run.seconds for run in runs.values())
    model = _model_record(first.model, f"{app.name} (variants {', '.join(runs)})", "trained by attnlab app compare")
    paths = first.attention_paths
    settings = {**config.to_dict(), "variant": None, "variants": list(runs)}  # every variant ran with these settings
    sections = {**_no_probe_sections(config.probes), "compare": [section.to_dict()]}
    return _envelope("app compare", settings, model, rows, paths, extras, sections, seconds)
