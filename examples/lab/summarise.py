"""Tables and figures for docs/findings.md from the reproduction runs (examples/lab/run_reproductions.sh).

    python examples/lab/summarise.py sinks runs/sink_emergence/jobs/* runs/sink_emergence_wd* --figure docs/img/lab_sinks.png
    python examples/lab/summarise.py entropy runs/entropy_collapse/jobs/* --figure docs/img/lab_entropy.png

Reads each run's ``results.csv`` (attnlab's results schema with a ``step`` column) and prints a markdown table:
``sinks``: final eval loss, the sink rate (Gu et al.'s ε = 0.3 indicator, mean over layers × heads × windows) at
every evaluation, and the final mean α₀; ``entropy``: final eval loss and the mean attention entropy (nats, mean
over layers × heads × query rows) at every evaluation, its minimum and the lowest single head at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def load(run: Path) -> pd.DataFrame:
    """A run's results.csv with a ``run`` column: the directory name without a sweep job's ``-wWIDTH-lrLR-TASK``
    suffix when it has one, e.g. ``masked`` (lr kept: ``masked lr0.004``)."""
    frame = pd.read_csv(run / "results.csv")
    name, _, rest = run.name.partition("-w")
    lr = rest.split("-")[1] if rest.count("-") >= 2 else ""
    frame["run"] = f"{name} {lr}".strip() if rest else run.name
    return frame


def final(frame: pd.DataFrame, probe: str, statistic: str) -> pd.DataFrame:
    rows = frame[(frame.probe == probe) & (frame.statistic == statistic)]
    return rows[rows.step == rows.step.max()]


def sinks(frames: list[pd.DataFrame]) -> tuple[str, dict[str, pd.Series]]:
    lines, curves = [], {}
    for frame in frames:
        overall = frame[(frame.probe == "sink") & (frame.statistic == "sink_rate") & frame.layer.isna()]
        curve = overall.set_index("step").value.sort_index()
        curves[frame.run.iloc[0]] = curve
        loss = final(frame, "train", "eval_loss").value.iloc[0]
        alpha = final(frame, "sink", "alpha")
        alpha0 = alpha[alpha.position == 0].value.mean()
        per_layer = final(frame, "sink", "sink_rate").dropna(subset=["layer"]).sort_values("layer")
        layers = " / ".join(f"{100 * v:.0f}" for v in per_layer.value)
        steps = ", ".join(f"{100 * v:.1f}" for v in curve.values)
        lines.append(f"| {frame.run.iloc[0]} | {loss:.3f} | {steps} | **{100 * curve.iloc[-1]:.1f}** | {layers} | "
                     f"{alpha0:.3f} |")
    header = ["| run | eval loss | sink rate % at steps " + ", ".join(str(int(s)) for s in curve.index) +
              " | final % | per layer % | mean α₀ |", "|---|---|---|---|---|---|"]
    return "\n".join(header + lines), curves


def entropy(frames: list[pd.DataFrame]) -> tuple[str, dict[str, pd.Series]]:
    lines, curves = [], {}
    for frame in frames:
        rows = frame[(frame.probe == "entropy") & (frame.statistic == "entropy")]
        curve = rows.groupby("step").value.mean().sort_index()
        curves[frame.run.iloc[0]] = curve
        loss = final(frame, "train", "eval_loss").value.iloc[0]
        lowest = rows[rows.step == rows.step.max()].value.min()
        steps = ", ".join(f"{v:.2f}" for v in curve.values)
        lines.append(f"| {frame.run.iloc[0]} | {loss:.3f} | {steps} | {curve.min():.2f} | {lowest:.2f} |")
    header = ["| run | eval loss | mean entropy (nats) at steps " + ", ".join(str(int(s)) for s in curve.index) +
              " | min | lowest head at end |", "|---|---|---|---|---|"]
    return "\n".join(header + lines), curves


def figure(curves: dict[str, pd.Series], ylabel: str, scale: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(curve.index, curve.values * scale, marker="o", label=name)
    ax.set(xlabel="training step", ylabel=ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["sinks", "entropy"])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args()
    frames = [load(run) for run in args.runs if (run / "results.csv").exists()]
    table, curves = (sinks if args.kind == "sinks" else entropy)(frames)
    print(table)
    if args.figure:
        ylabel, scale = ("sink rate (%)", 100.0) if args.kind == "sinks" else ("mean attention entropy (nats)", 1.0)
        figure(curves, ylabel, scale, args.figure)


if __name__ == "__main__":
    main()
