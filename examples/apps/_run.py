"""What every post-hoc script reads of a findings run: its settings (RUN/results.json "config"), a variant's
checkpoint with the run's data generator, and the run's eval batches."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attnlab.lab.apps.host import load_app


def run_settings(run: Path) -> dict[str, Any]:
    """The ``config`` of ``run/results.json`` (seed, data arguments, batch size, eval batches …)."""
    return json.loads((run / "results.json").read_text(encoding="utf-8"))["config"]


def load_variant(checkpoint: Path, settings: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(app, model, data)``: the checkpoint and the generator of the run (its seed and data arguments)."""
    app, model = load_app(checkpoint)
    return app, model, app.data(**{"seed": settings["seed"], **settings["data_args"]})


def eval_batches(data: Any, settings: dict[str, Any]) -> Iterator[dict]:
    """The run's eval batches 0 … eval_batches − 1, of its batch size."""
    for index in range(settings["eval_batches"]):
        yield data.batch(index, settings["batch_size"], split="eval")
