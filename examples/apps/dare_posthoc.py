"""Post-hoc numbers of the dare findings run (docs/apps/dare.md), from its eval batches and saved checkpoints.

    OMP_NUM_THREADS=1 attnlab app compare dare --out runs/dare
    python examples/apps/dare_posthoc.py runs/dare
    python examples/apps/dare_posthoc.py runs/dare-proj     # an `attnlab app train` folder works too

On the run's eval batches (seed, data arguments, batch size and count read from RUN/results.json):

1. Data-only reference AUCs (no model), each computed with `attnlab.lab.apps.metrics.auc` per eval batch and
   then averaged, as the app's `auc` metric: the label's own score (the style agreement over every same-category
   behaviour); the agreement over the first `top_k` behaviours (a search that ignores relevance); the count of
   same-category behaviours; the style agreement over the whole history (no search). Then the chance
   `recall_at_k` of a search that ignores relevance, top_k / seq_len.
2. Each saved checkpoint's `auc` on the same batches (it should equal the run's table: the batches are the same).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from attnlab.lab.apps.dare import click_labels
from attnlab.lab.apps.metrics import auc
from _run import eval_batches, load_variant, run_settings  # examples/apps/_run.py, beside this script


def references(data, settings: dict, top_k: int) -> dict[str, float]:
    """Mean over eval batches of each data-only score's AUC."""
    totals: dict[str, float] = {}
    for batch in eval_batches(data, settings):
        behaviours, candidates, labels = batch["behaviours"].numpy(), batch["candidates"].numpy(), batch["labels"]
        _, _, first_k = click_labels(behaviours[:, :top_k], candidates, data.styles, data.per_category,
                                     data.threshold)
        whole = data.styles[candidates] * data.styles[behaviours].sum(axis=1, keepdims=True)  # (B, M)
        scores = {"label's own score (agreement, every same-category behaviour)": batch["agreement"],
                  f"agreement over the first {top_k} behaviours (no relevance)": torch.from_numpy(first_k),
                  "count of same-category behaviours": batch["relevant"].sum(-1),
                  "style agreement over the whole history (no search)": torch.from_numpy(whole)}
        for name, score in scores.items():
            totals[name] = totals.get(name, 0.0) + auc(score.double(), labels)
    return {name: total / settings["eval_batches"] for name, total in totals.items()}


def model_auc(app, model, data, settings: dict) -> float:
    total = 0.0
    with torch.no_grad():
        for batch in eval_batches(data, settings):
            total += app.metrics(model, batch)["auc"][0]
    return total / settings["eval_batches"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", default="runs/dare",
                        help="the folder of `attnlab app compare dare` (or of `attnlab app train dare`)")
    run = Path(parser.parse_args().run)
    settings = run_settings(run)
    checkpoints = sorted(run.glob("*/checkpoint")) or [run / "checkpoint"]
    loaded = [load_variant(folder, settings) for folder in checkpoints]
    app, _, data = loaded[0]
    top_k = app.model_args["top_k"] or 16
    print(f"data-only references ({settings['eval_batches']} eval batches of {settings['batch_size']} users, "
          "auc per batch then averaged)")
    for name, value in references(data, settings, top_k).items():
        print(f"  {name:62} auc {value:.3f}")
    print(f"  chance recall_at_k of a search that ignores relevance: {top_k}/{data.seq_len} = "
          f"{top_k / data.seq_len:.3f}")
    for folder, (app, model, _) in zip(checkpoints, loaded):
        print(f"checkpoint {folder}: {app.variant}, projections={app.model_args['projections']}, "
              f"auc {model_auc(app, model, data, settings):.4f}")


if __name__ == "__main__":
    main()
