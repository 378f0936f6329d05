"""Reproduction 3 (issue 11): MQAR accuracy per mechanism at a fixed budget (Zoology, Arora et al. 2023).

Step 1 (configs/mqar_lr.yaml): each mechanism's learning rate, best of {1e-3, 3e-3, 1e-2} by final eval accuracy
on the smallest cell ((seq_len 64, 4 pairs), width 64). Step 2: every mechanism at its learning rate on
(seq_len, pairs) ∈ {(64, 4), (128, 8), (256, 16)} × width ∈ {32, 128}, same budget (configs/mqar_lr.yaml's
``train`` block). Writes ``OUT/mqar_table.md`` and ``OUT/mqar.csv`` (one row per cell). Settings: PLAN.md item 3.

    python examples/lab/mqar.py --out runs/mqar --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CELLS = [(64, 4), (128, 8), (256, 16)]
WIDTHS = [32, 128]


def sweep(config: Path, out: Path, jobs: int) -> list[dict[str, str]]:
    if not (out / "sweep.csv").exists():
        done = subprocess.run([sys.executable, "-m", "attnlab", "sweep", str(config), "--jobs", str(jobs), "--out",
                               str(out), *(["--resume"] if out.exists() else [])], check=False)
        if done.returncode not in (0, 1) or not (out / "sweep.csv").exists():  # 1 = some jobs failed, table written
            raise SystemExit(f"sweep {config} failed with exit code {done.returncode}; see {out}")
    with open(out / "sweep.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/mqar"))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((HERE / "configs" / "mqar_lr.yaml").read_text())
    sweep(HERE / "configs" / "mqar_lr.yaml", args.out / "lr", args.jobs)
    with open(args.out / "lr" / "best.csv", newline="") as handle:
        best = {row["layer"]: float(row["best_lr"]) for row in csv.DictReader(handle)}
    print("learning rates:", best, flush=True)
    grid = dict(base)
    grid["grid"] = {"layers": [], "widths": WIDTHS, "lrs": [], "tasks": [
        {"name": f"mqar{n}x{p}", "task": "mqar", "task_args": {"vocab_size": 512, "seq_len": n, "num_kv_pairs": p}}
        for n, p in CELLS]}
    rows = []
    for entry in base["grid"]["layers"]:
        name = entry if isinstance(entry, str) else entry["name"]
        config = {**grid, "grid": {**grid["grid"], "layers": [entry], "lrs": [best[name]]}}
        path = args.out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        rows += sweep(path, args.out / name, args.jobs)
    keys = ["layer", "width", "task", "lr", "status", "eval_accuracy", "eval_loss", "steps", "train_seconds"]
    with open(args.out / "mqar.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| mechanism (lr) | " + " | ".join(f"({n},{p}) w{w}" for n, p in CELLS for w in WIDTHS) + " |",
             "|---|" + "---|" * (len(CELLS) * len(WIDTHS))]
    for entry in base["grid"]["layers"]:
        name = entry if isinstance(entry, str) else entry["name"]
        cells = []
        for n, p in CELLS:
            for width in WIDTHS:
                row = next((r for r in rows if r["layer"] == name and int(r["width"]) == width
                            and r["task"] == f"mqar{n}x{p}"), None)
                ok = row is not None and row["status"] == "ok" and row["eval_accuracy"]
                cells.append(f"{100 * float(row['eval_accuracy']):.0f}" if ok else "failed")
        lines.append(f"| {name} ({best[name]:g}) | " + " | ".join(cells) + " |")
    (args.out / "mqar_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
