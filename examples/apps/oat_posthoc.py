"""Post-hoc numbers of the oat findings run (docs/apps/oat.md, docs/findings.md), from its saved checkpoints.

    OMP_NUM_THREADS=1 attnlab app compare oat --out runs/oat
    python examples/apps/oat_posthoc.py runs/oat

On the run's eval scenes (seed, batch size and count read from RUN/results.json):

1. Each variant's greedy scanpath scored per scene with the app's `sequence_score` (its mean is the table's
   `scanpath_sim`); the paired difference `object_pe` − `plain_pe` with its standard error (std / √scenes), and
   the share of scenes where the two greedy scanpaths differ (and where their scores differ).
2. The ceiling of a greedy decoder: the search model's own scanpath without its Gumbel noise
   (`search_scanpaths` with zero noise draws), scored against the sampled scanpath (`scanpath_sim` and
   `length_error` as the app computes them).
3. The learned relation gains gain_h of every `object_attention` site and head (initialised at 1.0).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from attnlab.lab.apps.oat import search_scanpaths, sequence_score
from _run import eval_batches, load_variant, run_settings  # examples/apps/_run.py, beside this script

VARIANTS = ("object_pe", "plain_pe")


def observed(row: np.ndarray) -> list[int]:
    """A scanpath row (−1 after its end) as a list of fixated objects."""
    return [int(i) for i in row if i >= 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", default="runs/oat", help="the folder of `attnlab app compare oat`")
    run = Path(parser.parse_args().run)
    settings = run_settings(run)
    loaded = {variant: load_variant(run / variant / "checkpoint", settings) for variant in VARIANTS}
    app, _, data = loaded[VARIANTS[0]]
    scores: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    paths: dict[str, list[list[int]]] = {variant: [] for variant in VARIANTS}
    ceiling, ceiling_length_error = [], []
    with torch.no_grad():
        for index, batch in enumerate(eval_batches(data, settings)):
            wanted = [observed(row) for row in batch["scanpath"].numpy()]
            for variant, (_, model, _) in loaded.items():
                for want, row in zip(wanted, model.predict(batch).numpy()):
                    paths[variant].append(observed(row))
                    scores[variant].append(sequence_score(paths[variant][-1], want))
            # the same scenes as float64 arrays, for the search model
            scene = data.sample(data.rng(index, "eval"), settings["batch_size"])
            centres = 0.5 * (scene["boxes"][..., :2] + scene["boxes"][..., 2:])
            rows = np.arange(len(centres))
            colour, shape, target = scene["colour"], scene["shape"], scene["target_index"]
            sim = 0.5 * (colour == colour[rows, target][:, None]) + 0.5 * (shape == shape[rows, target][:, None])
            no_noise = np.zeros(sim.shape + sim.shape[1:])  # (B, N, N) Gumbel draws set to 0
            greedy, _, _ = search_scanpaths(centres, sim, target, no_noise,
                                            target_weight=data.target_weight, distance_weight=data.distance_weight,
                                            noise=data.noise)
            for want, row in zip(wanted, greedy):
                ceiling.append(sequence_score(observed(row), want))
                ceiling_length_error.append(abs(len(observed(row)) - len(want)))
    a, b = (np.array(scores[variant]) for variant in VARIANTS)
    diff = a - b
    differ = np.mean([x != y for x, y in zip(*paths.values())])
    score_differs = np.mean(diff != 0)
    print(f"scanpath_sim over {len(diff)} scenes: {VARIANTS[0]} {a.mean():.4f}, {VARIANTS[1]} {b.mean():.4f}")
    se = diff.std(ddof=1) / len(diff) ** 0.5
    print(f"paired difference {VARIANTS[0]} − {VARIANTS[1]}: {diff.mean():+.4f} ± {se:.4f} (s.e.); "
          f"the greedy scanpaths differ on {100 * differ:.0f}% of the scenes, their scores on "
          f"{100 * score_differs:.0f}%")
    for variant, (_, model, _) in loaded.items():
        gains = torch.stack([site.layer.gain.detach() for site in model.attention_sites])  # (sites, heads)
        print(f"{variant}: relation gains {gains.min():.2f} … {gains.max():.2f} over {gains.numel()} (site, head)")
    print(f"search model's noiseless greedy scanpath: scanpath_sim {np.mean(ceiling):.4f}, "
          f"length_error {np.mean(ceiling_length_error):.4f}")


if __name__ == "__main__":
    main()
