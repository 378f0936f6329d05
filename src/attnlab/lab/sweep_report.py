"""The results dict of a sweep (docs/results.md, command ``sweep``): one row per job and final statistic, the
jobs and best-of-lrs tables as extras, drawn as :class:`attnlab.report.sections.Table` sections."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attnlab import __version__
from attnlab.columns import SCHEMA_VERSION
from attnlab.lab.train_results import versions
from attnlab.report.sections import Column, Section, Table, Text

__all__ = ["SWEEP_SECTIONS", "sweep_results"]

STATISTICS = ("eval_loss", "eval_accuracy", "train_loss", "steps", "num_parameters", "wall_seconds")

SWEEP_SECTIONS = (Section("sweep", "Sweep", (
    Text(template="{jobs_count} job(s), {failed} failed, {parallel} at a time; {seconds} s in all. Sweep file: {file}."),
    Table((Column("layer", "layer", "text"), Column("width", "width"), Column("task", "task", "text"),
           Column("best_lr", "best lr"), Column("eval_accuracy_percent", "eval accuracy %"),
           Column("eval_loss", "eval loss"), Column("steps", "steps"), Column("num_parameters", "parameters"),
           Column("lrs_tried", "lrs tried", "text")),
          extras="best", title="Best of the learning rates",
          caption="Per layer, width and task: the learning rate whose last evaluation has the highest accuracy "
                  "(ties: lowest eval loss)."),
    Table((Column("job", "job", "text"), Column("status", "status", "text"),
           Column("eval_accuracy_percent", "eval accuracy %"), Column("eval_loss", "eval loss"),
           Column("sink_rate_percent", "sink rate %"), Column("mean_entropy", "mean entropy (nats)"),
           Column("train_loss", "train loss"), Column("steps", "steps"), Column("num_parameters", "parameters"),
           Column("wall_seconds", "wall s"), Column("error", "error", "text")),
          extras="jobs", title="Every job", caption="{total} job(s); sweep.csv holds the same table."),
)),)


def _percent(row: Mapping[str, Any]) -> dict[str, Any]:
    accuracy, sinks = row.get("eval_accuracy"), row.get("sink_rate")
    return {**row, "eval_accuracy_percent": None if accuracy is None else 100 * accuracy,
            "sink_rate_percent": None if sinks is None else 100 * sinks}


def sweep_results(path: str | Path, rows: list[dict[str, Any]], best: list[dict[str, Any]], *, jobs: int,
                  seconds: float) -> dict[str, Any]:
    """Rows ``probe="sweep"``, ``statistic`` in :data:`STATISTICS`, with the job's settings as extra keys."""
    result_rows = []
    for row in rows:
        for statistic in STATISTICS:
            value = row.get(statistic)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            result_rows.append({"probe": "sweep", "variant": None, "statistic": statistic, "layer": None,
                                "head": None, "position": None, "value": float(value), "job": row["job"],
                                "layer_name": row["layer"], "width": row["width"], "lr": row["lr"],
                                "task": row["task"]})
    failed = sum(row["status"] != "ok" for row in rows)
    extras = {"jobs": [_percent(row) for row in rows], "best": [_percent(row) for row in best],
              "jobs_count": len(rows), "file": str(path), "parallel": jobs, "failed": failed,
              "seconds": round(seconds, 1)}
    return {
        "schema_version": SCHEMA_VERSION,
        "attnlab_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "sweep",
        "config": {"sweep": str(path), "jobs": jobs},
        "model": {"name": f"sweep of {len(rows)} TinyLM job(s)", "source": f"sweep file {path}"},
        "versions": versions(),
        "rows": result_rows,
        "extras": {"sweep": extras},
        "sections": {"sweep": [section.to_dict() for section in SWEEP_SECTIONS]},
        "timing": {"seconds": round(seconds, 3)},
    }
