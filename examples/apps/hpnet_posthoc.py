"""Post-hoc numbers of the hpnet findings run (docs/apps/hpnet.md, docs/findings.md), from its saved checkpoints.

    OMP_NUM_THREADS=1 attnlab app compare hpnet --out runs/hpnet
    python examples/apps/hpnet_posthoc.py runs/hpnet

1. Paired differences `hpa` − `no_hpa` over the evaluation agents (the run's eval batches, seed and data
   arguments, read from RUN/results.json): min ADE at the last and at the first forecast time, its standard error
   (std / √agents) and the share of agents where `hpa` is better. The means should equal the printed table.
2. The HPA site (site 1) of `hpa`: the distance probe rerun on eval batch 0 (as at the run's last evaluation):
   attention mass by time difference Δ (log2 bins, mean over heads) and each head's power-law exponent
   (mean attention ∝ Δ^(−exponent), so a negative exponent means more attention on older forecasts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from attnlab.lab.apps.hpnet import forecast_errors
from attnlab.lab.apps.train import AppTrainConfig
from attnlab.lab.train_results import probe_pass
from _run import eval_batches, load_variant, run_settings  # examples/apps/_run.py, beside this script

HPA_SITE = 1


def per_agent_ade(run: Path, variant: str, settings: dict) -> torch.Tensor:
    """(agents, T) min ADE over modes of every eval agent at every forecast time, float64."""
    app, model, data = load_variant(run / variant / "checkpoint", settings)
    rows = []
    with torch.no_grad():
        for batch in eval_batches(data, settings):
            errors = forecast_errors(model(batch["observed"]), batch["future"])  # (B, N, T, K, F)
            rows.append(errors.mean(dim=-1).min(dim=-1).values.flatten(0, 1))  # (B·N, T)
    return torch.cat(rows).double()


def paired(run: Path, settings: dict) -> None:
    hpa, no_hpa = per_agent_ade(run, "hpa", settings), per_agent_ade(run, "no_hpa", settings)
    print(f"paired over {hpa.shape[0]} agents (hpa − no_hpa; better = lower ADE)")
    print(f"{'metric':14} {'hpa':>7} {'no_hpa':>7} {'diff':>7} {'s.e.':>6} {'hpa better':>10}")
    for name, t in (("min_ade_last", -1), ("min_ade_first", 0)):
        diff = hpa[:, t] - no_hpa[:, t]
        se = diff.std() / diff.numel() ** 0.5
        better = (diff < 0).double().mean()
        print(f"{name:14} {hpa[:, t].mean():7.4f} {no_hpa[:, t].mean():7.4f} {diff.mean():+7.3f} {se:6.3f} "
              f"{100 * better:9.0f}%")


def hpa_distance(run: Path, settings: dict) -> None:
    app, model, data = load_variant(run / "hpa" / "checkpoint", settings)
    config = AppTrainConfig(app="hpnet", variant="hpa", probes=("distance",),
                            probe_args=settings.get("probe_args", {}))
    batch = data.batch(0, settings["batch_size"], split="eval")
    rows, _ = probe_pass(model, config, forward=lambda m: app.loss(m, batch))
    site = [row for row in rows if row["layer"] == HPA_SITE]
    mass: dict[int, list[float]] = {}
    for row in site:
        if row["statistic"] == "mass":
            mass.setdefault(int(row["position"]), []).append(row["value"])
    starts = sorted(mass)
    labels = [f"Δ={s}" if s < 2 else f"Δ={s}–{2 * s - 1}" for s in starts[:-1]] + [f"Δ≥{starts[-1]}"]
    print("\nHPA site of hpa, attention mass by Δ (eval batch 0, mean over heads)")
    print("  ".join(f"{label} {sum(v) / len(v):.3f}" for label, v in zip(labels, (mass[s] for s in starts))))
    fits = sorted((row for row in site if row["statistic"] == "power_law_exponent"), key=lambda r: r["head"])
    exponents = [row["value"] for row in fits]
    older = sum(e < 0 for e in exponents)
    print("power-law exponent per head: " + ", ".join(f"{e:+.2f}" for e in exponents)
          + f" (mean {sum(exponents) / len(exponents):+.2f}); {older} of {len(exponents)} heads attend more to "
          "older forecasts (exponent < 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", default="runs/hpnet", help="the folder of `attnlab app compare hpnet`")
    run = Path(parser.parse_args().run)
    settings = run_settings(run)
    torch.set_grad_enabled(False)
    paired(run, settings)
    hpa_distance(run, settings)


if __name__ == "__main__":
    main()
