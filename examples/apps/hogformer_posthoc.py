"""Post-hoc numbers of the hogformer findings runs (docs/apps/hogformer.md, docs/findings.md), from the saved
checkpoints of one or more seeds.

    OMP_NUM_THREADS=1 attnlab app compare hogformer --out runs/hogformer
    OMP_NUM_THREADS=1 attnlab app compare hogformer --seed 1 --out runs/hogformer-seed1
    python examples/apps/hogformer_posthoc.py runs/hogformer runs/hogformer-seed1

Each variant's checkpoint is evaluated on its run's eval batches (the trainer's `evaluate`, settings read from
RUN/results.json), which gives the table's metrics unrounded. From them: the PSNR differences between variants
(overall and per degradation) with the reading rule (the same sign in every seed and at least 0.2 dB in each),
and each variant's gain over the degraded input per degradation. Values are listed seed by seed, separated by "/".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from attnlab.lab.apps.hogformer import DEGRADATIONS
from attnlab.lab.apps.train import AppTrainConfig, evaluate
from _run import load_variant, run_settings  # examples/apps/_run.py, beside this script

VARIANTS = ("hog", "no_hog", "hog_input")
COMPARISONS = (("hog", "no_hog"), ("hog_input", "no_hog"), ("hog", "hog_input"))
RULE_DB = 0.2


def run_metrics(run: Path) -> dict[str, dict[str, float]]:
    """variant → the final metrics of its checkpoint on the run's eval batches."""
    settings = run_settings(run)
    out = {}
    for variant in VARIANTS:
        app, model, data = load_variant(run / variant / "checkpoint", settings)
        config = AppTrainConfig(app="hogformer", variant=variant, model_args=settings["model_args"],
                                batch_size=settings["batch_size"], eval_batches=settings["eval_batches"])
        out[variant] = evaluate(app, model, data, config)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", default=["runs/hogformer"],
                        help="folders of `attnlab app compare hogformer`, one per seed")
    runs = [Path(run) for run in parser.parse_args().runs]
    seeds = [run_metrics(run) for run in runs]
    metrics = ["psnr", *(f"psnr_{name}" for name in DEGRADATIONS)]

    def joined(values: list[float], spec: str = "+.2f") -> str:
        return " / ".join(f"{value:{spec}}" for value in values)

    print("runs: " + " / ".join(str(run) for run in runs))
    print("\nmetrics (unrounded table values)")
    for variant in VARIANTS:
        cells = [f"{m} {joined([s[variant][m] for s in seeds], '.5f' if m == 'loss' else '.2f')}"
                 for m in ["loss", *metrics]]
        print(f"  {variant:10} " + "  ".join(cells))
    print(f"\ndifferences in PSNR (dB); 'yes' = the same sign in every seed and at least {RULE_DB} dB in each")
    print(f"  {'comparison':20} " + "  ".join(f"{m:22}" for m in metrics))
    for a, b in COMPARISONS:
        cells = []
        for m in metrics:
            diffs = [s[a][m] - s[b][m] for s in seeds]
            passes = all(abs(d) >= RULE_DB for d in diffs) and len({d > 0 for d in diffs}) == 1
            cells.append(f"{joined(diffs)} ({'yes' if passes else 'no'})")
        print(f"  {a + ' − ' + b:20} " + "  ".join(f"{cell:22}" for cell in cells))
    print("\ngain over the degraded input (dB)")
    for variant in VARIANTS:
        print(f"  {variant:10} " + "  ".join(
            f"{name} {joined([s[variant][f'psnr_{name}'] - s[variant][f'psnr_in_{name}'] for s in seeds])}"
            for name in DEGRADATIONS))
    print("\neval L1 of hog_input relative to no_hog: "
          + joined([100 * (s["hog_input"]["loss"] / s["no_hog"]["loss"] - 1) for s in seeds]) + " %")


if __name__ == "__main__":
    main()
