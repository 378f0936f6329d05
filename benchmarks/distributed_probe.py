"""Speedup of a data-parallel probe run: ``torchrun --nproc-per-node 2 -m attnlab probe`` against one process.

What runs: ``attnlab probe`` with the four default report probes (``entropy``, ``sink``, ``distance``, ``norms``)
on the bundled SmolLM2-135M reading the bundled Shakespeare, ``--seq-len`` tokens per window, batch 1, no pattern
viewer. Each configuration is a fresh command (model load included) in its own process(es):

- ``1p×Nt``: one process, ``N`` torch threads (``OMP_NUM_THREADS=N``), for N in ``--threads`` (default 1 and 2);
- ``2p×1t``: ``torchrun --standalone --nproc-per-node 2``, one thread per process (torchrun's default).

Each configuration runs at two window counts (``--windows``, default 8 and 24). The end-to-end wall time includes
the fixed cost of a command (imports, model load, tokenising the corpus), which does not shrink with processes; the
marginal time per window, ``(T(24) − T(8)) / 16``, is the part data parallelism divides. Both are reported, with

    speedup = time(1p×1t) / time(2p×1t)        efficiency = speedup / 2

(and the same against ``1p×2t``, the whole machine in one process). Every timing is the median of ``--repeats``
runs; each run also records the CPU seconds of every process it started and the load average just before it (the
machine is shared: a run with a load above 0.5 before it shared the cores). The 2-process results are checked against the 1-process results of the same windows: the largest absolute
difference of any row's value (the states merge in a different order, so it is not 0).

    python benchmarks/distributed_probe.py                                  # the docs run (~10 min on 2 cores)
    python benchmarks/distributed_probe.py --windows 2 4 --repeats 1        # smoke test
    python benchmarks/distributed_probe.py --render bench-results/distributed_probe.json --markdown

This file is not part of the attnlab package and is never imported by it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_overhead import machine_header  # noqa: E402

PROBES = ("entropy", "sink", "distance", "norms")


def command(processes: int, windows: int, seq_len: int, out: Path) -> list[str]:
    attnlab = ["-m", "attnlab", "probe", *[f"--probe={p}" for p in PROBES], "--seq-len", str(seq_len),
               "--max-windows", str(windows), "--pattern-heads", "none", "--out", str(out), "--force"]
    if processes == 1:
        return [sys.executable, *attnlab]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            *attnlab]


def run_once(processes: int, threads: int, windows: int, seq_len: int, out: Path
             ) -> tuple[float, float, float, list[dict]]:
    """``(wall seconds, CPU seconds of every process it started, the 1-minute load average before, rows)``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command(processes, windows, seq_len, out), env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{processes}p×{threads}t, {windows} windows failed:\n{done.stderr[-3000:]}")
    rows = json.loads((out / "results.json").read_text())["rows"]
    return seconds, cpu, load, rows


def max_difference(a: list[dict], b: list[dict]) -> float:
    key = ("probe", "statistic", "layer", "head", "position")
    left = {tuple(r[k] for k in key): r["value"] for r in a}
    right = {tuple(r[k] for k in key): r["value"] for r in b}
    if left.keys() != right.keys():
        raise SystemExit(f"the runs produced different rows ({len(left)} vs {len(right)})")
    return max((abs(left[k] - right[k]) for k in left if left[k] == left[k]), default=0.0)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    configs = [(1, t) for t in args.threads] + [(2, 1)]
    cells: list[dict[str, Any]] = []
    rows_by: dict[tuple[int, int, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for windows in args.windows:
            for processes, threads in configs:
                times, cpus, loads = [], [], []
                for repeat in range(args.repeats):
                    out = Path(scratch) / f"{processes}x{threads}-{windows}-{repeat}"
                    seconds, cpu, load, rows = run_once(processes, threads, windows, args.seq_len, out)
                    times.append(seconds)
                    cpus.append(cpu)
                    loads.append(load)
                    rows_by[(processes, threads, windows)] = rows
                    print(f"{processes}p×{threads}t {windows:3d} windows: {seconds:7.2f} s wall, {cpu:7.2f} s CPU, "
                          f"load before {load:.2f}", flush=True)
                cells.append({"processes": processes, "threads": threads, "windows": windows,
                              "seconds": times, "cpu_seconds": cpus, "load_before": loads,
                              "median": statistics.median(times)})
    largest = max(args.windows)
    check = max_difference(rows_by[(1, 1 if 1 in args.threads else args.threads[0], largest)],
                           rows_by[(2, 1, largest)])
    return {**machine_header(), "benchmark": "distributed_probe", "seq_len": args.seq_len, "probes": list(PROBES),
            "repeats": args.repeats, "windows": list(args.windows), "cells": cells,
            "max_abs_difference_2p_vs_1p": check, "loadavg": os.getloadavg()}


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per configuration: end-to-end seconds at the largest window count, marginal seconds per window, and the
    speedup/efficiency of 2 processes against each 1-process configuration."""
    small, large = min(result["windows"]), max(result["windows"])
    median = {(c["processes"], c["threads"], c["windows"]): c["median"] for c in result["cells"]}
    configs = sorted({(p, t) for p, t, _ in median})
    lines = []
    for p, t in configs:
        marginal = (median[(p, t, large)] - median[(p, t, small)]) / (large - small) if large > small else None
        lines.append({"config": f"{p}p×{t}t", "processes": p, "threads": t, "end_to_end": median[(p, t, large)],
                      "per_window": marginal})
    two = next(line for line in lines if line["processes"] == 2)
    for line in lines:
        if line["processes"] == 1:
            line["speedup_end_to_end"] = line["end_to_end"] / two["end_to_end"]
            if line["per_window"] and two["per_window"]:
                line["speedup_per_window"] = line["per_window"] / two["per_window"]
    return lines


def render(result: dict[str, Any], markdown: bool) -> str:
    large = max(result["windows"])
    out = [f"{result['date']} · {result['cpu']} · {result['cores']} cores · torch {result['torch']} · "
           f"seq_len {result['seq_len']} · windows {result['windows']} · median of {result['repeats']}",
           "", "| config | end-to-end s (" + str(large) + " windows) | s per window (marginal) | 2p speedup "
           "end-to-end | 2p speedup per window | efficiency per window |", "|---|---|---|---|---|---|"]
    for line in summary(result):
        per = line["per_window"]
        speed_e = line.get("speedup_end_to_end")
        speed_w = line.get("speedup_per_window")
        out.append(f"| {line['config']} | {line['end_to_end']:.2f} | {per:.3f} | "
                   f"{'' if speed_e is None else f'{speed_e:.2f}×'} | {'' if speed_w is None else f'{speed_w:.2f}×'} "
                   f"| {'' if speed_w is None else f'{speed_w / 2:.0%}'} |")
    out += ["", f"largest |2p − 1p| over all rows: {result['max_abs_difference_2p_vs_1p']:.3g}; "
                f"load average {result['loadavg']}"]
    text = "\n".join(out)
    return text if markdown else text.replace("|", " ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs=2, default=[8, 24], metavar=("SMALL", "LARGE"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench-results/distributed_probe.json"))
    parser.add_argument("--render", type=Path, help="print the table of a saved run instead of measuring")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if args.render is not None:
        if not args.render.is_file():
            raise SystemExit(f"error: {args.render} does not exist; run the benchmark first")
        print(render(json.loads(args.render.read_text()), args.markdown))
        return
    result = measure(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    temp = args.json.with_suffix(".tmp")
    temp.write_text(json.dumps(result, indent=1))
    temp.replace(args.json)
    print(render(result, args.markdown))
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
