"""What a training run writes besides its checkpoint: ``train_log.csv`` and the results dict (docs/results.md)
with step curves.

Rows of the results dict:

- probe ``train``: ``{split}_{statistic}`` (``train_loss``, ``train_accuracy``, ``train_lr``, ``train_grad_norm``,
  ``eval_loss``, ``eval_accuracy``) with an empty layer/head/position and the ``step`` key;
- every probe run at each evaluation (``sink``, ``entropy`` ...): its usual rows plus ``step``.

The Run table: device (the model's), source ("trained by attnlab train" and the out directory) and the
attention paths of the probes' Session (``attention_paths``; recorded by :func:`probe_pass` over one eval
sequence when the caller does not pass those of its last evaluation). There are no windows: the report has no
"Tokens as fed" section.

Sections (``results["sections"]``, drawn by the generic renderer as :class:`attnlab.report.sections.StepCurve`):
``train`` → loss (log scale), accuracy and learning rate against the step; ``sink`` → the sink rate against the
step (all layers and each layer); ``entropy`` → mean attention entropy against the step. Other probes get no
section here (their per-step rows are in results.csv): their own sections average over layers and heads, not
over steps.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from attnlab import __version__
from attnlab.columns import SCHEMA_VERSION
from attnlab.io_utils import atomic_write_text
from attnlab.report.sections import Section, Series, StepCurve, Text

__all__ = ["TRAINING_SECTIONS", "log_to_csv", "probe_pass", "results_dict", "versions", "write_log"]

TRAINING_SECTIONS: dict[str, tuple[Section, ...]] = {
    "train": (Section("training", "Training", (
        Text(template="A {layer} TinyLM ({num_layers} layers, width {width}, {num_parameters} parameters) trained "
                      "for {step} of {steps} steps on {task} ({optimizer}, lr {lr}, batch {batch_size}); last "
                      "evaluation: loss {eval_loss}, accuracy {eval_accuracy_percent} %.{early}"),
        StepCurve((Series("train_loss", "train", layers="none"), Series("eval_loss", "eval", layers="none")),
                  title="Loss", ylabel="cross-entropy (nats)", logy=True,
                  caption="Mean cross-entropy over the labelled positions: each update's batch (train) and the eval "
                          "batches at each evaluation (eval)."),
        StepCurve((Series("train_accuracy", "train", layers="none", scale=100.0),
                   Series("eval_accuracy", "eval", layers="none", scale=100.0)),
                  title="Task accuracy", ylabel="% of labelled positions", ylim=(0.0, 100.0)),
        StepCurve((Series("train_lr", "learning rate", layers="none"),), title="Learning rate", ylabel="lr"),
    )),),
    "sink": (Section("training-sinks", "Attention sinks over training", (
        StepCurve((Series("sink_rate", "all layers", layers="none", scale=100.0, color="#000000"),
                   Series("sink_rate", "layer {layer}", layers="each", scale=100.0, dashed=True)),
                  title="Sink rate", ylabel="% of heads × windows with α₀ > ε",
                  caption="Share of (head, sequence) pairs whose mean attention on the first token exceeds ε "
                          "(Gu et al. 2025), measured on eval batch 0 at each evaluation."),
    )),),
    "entropy": (Section("training-entropy", "Attention entropy over training", (
        StepCurve((Series("entropy", "all layers", color="#000000"),
                   Series("entropy", "layer {layer}", layers="each", dashed=True)),
                  title="Mean attention entropy", ylabel="nats",
                  caption="Mean row entropy over heads (and layers), eval batch 0 at each evaluation; a collapse "
                          "towards 0 is Zhai et al. (2023)'s entropy collapse."),
    )),),
}
"""Sections of a training run's results, keyed by probe (``train`` is the run itself)."""


def log_to_csv(log: list[dict[str, Any]]) -> str:
    """``step,split,statistic,value`` lines; floats written with ``repr`` (they read back exactly)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("step", "split", "statistic", "value"))
    for row in log:
        writer.writerow((row["step"], row["split"], row["statistic"], repr(float(row["value"]))))
    return buffer.getvalue()


def write_log(path: Path, log: list[dict[str, Any]]) -> Path:
    """``train_log.csv`` (see :func:`log_to_csv`), written through a temporary file."""
    return atomic_write_text(path, log_to_csv(log))


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "attnlab": __version__}


def probe_pass(model: Any, config: Any, input_ids: Any = None, step: int | None = None, *,
               forward: Callable[[Any], Any] | None = None, variant: str | None = None
               ) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Run ``config.probes`` (with ``config.probe_args``) in a Session over one forward pass in eval mode, no
    gradient; returns their rows (with ``step`` and ``variant``) and the layer → attention path of that Session.
    ([], {}) without probes. The forward is ``forward(model)`` (an application's loss), else
    ``model(input_ids=input_ids)`` with ``input_ids`` (B, T). Probes are prepared as
    :func:`attnlab.pipeline.run_probes` does, without a runner (TrainConfig refuses probes that need one)."""
    import torch

    from attnlab.capture.architectures import model_facts
    from attnlab.capture.session import Session
    from attnlab.params import build_probes

    if not config.probes:
        return [], {}
    probes = build_probes(config.probes, config.probe_args)
    facts = model_facts(model)
    for probe in probes:
        probe.prepare(facts, None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), Session(model, probes=probes) as session:
            if forward is not None:
                forward(model)
            else:
                model(input_ids=input_ids)
    finally:
        model.train(was_training)
    rows = [{**row, "variant": variant, "step": step} for row in session.rows()]
    return rows, dict(session.attention_paths)


def results_dict(config: Any, model: Any, tokenizer: Any, task: Any, *, log: list[dict[str, Any]],
                 probe_rows: list[dict[str, Any]], step: int, stopped_early: bool, num_parameters: int,
                 seconds: float, final: dict[str, float],
                 paths: Mapping[int, str] | None = None) -> dict[str, Any]:
    """The results dict of a training run (docs/results.md, command ``train``); see the module docstring.

    ``paths``: layer → attention path of the last evaluation's Session; None records them with a
    :func:`probe_pass` over eval sequence 0.
    """
    from attnlab.capture.loading import LoadedModel

    loaded = LoadedModel.wrap(model, tokenizer, name=f"tinylm-{config.layer}")
    if paths is None:
        paths = probe_pass(model, config, task.batch(0, 1, split="eval")["input_ids"])[1]
    device = next((str(p.device) for p in model.parameters()), "cpu")
    source = "trained by attnlab train" + (f" in {config.out}" if config.out is not None else " (not saved)")
    rows = [{"probe": "train", "variant": None, "statistic": f"{row['split']}_{row['statistic']}", "layer": None,
             "head": None, "position": None, "value": row["value"], "step": row["step"]} for row in log]
    accuracy = final.get("eval_accuracy")
    extras = {
        **config.to_dict(), "step": step, "stopped_early": stopped_early, "num_parameters": num_parameters,
        **final, "eval_accuracy_percent": None if accuracy is None else 100 * accuracy,
        "early": " Stopped early: the target accuracy was reached." if stopped_early else "",
        "task_description": task.describe(), "seconds": round(seconds, 3),
    }
    sections = {"train": [s.to_dict() for s in TRAINING_SECTIONS["train"]]}
    for name in config.probes:
        sections[name] = [s.to_dict() for s in TRAINING_SECTIONS.get(name, ())]
    return {
        "schema_version": SCHEMA_VERSION,
        "attnlab_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "train",
        "config": config.to_dict(),
        "model": {**loaded.model_record(loaded.facts.name), "source": source, "device": device},
        "tokenizer": {**loaded.tokenizer_facts, "class": type(tokenizer).__name__},
        "seed": config.seed,
        "versions": versions(),
        "attention_paths": {str(layer): path for layer, path in sorted(paths.items())},
        "windows": [],
        "rows": rows + [dict(row) for row in probe_rows],
        "extras": {"train": extras},
        "sections": sections,
        "timing": {"seconds": round(seconds, 3)},
    }
