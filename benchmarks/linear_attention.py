"""Chunk-form decaying linear attention against causal SDPA and flash-linear-attention's naive chunk reference.

Shapes: batch 1, 8 heads, head_dim 64, float32, CPU; seq_len 1024 … 16384. Implementations:

- ``chunk``: ``attnlab.functional.linear_attention.linear_attention_chunk`` with RetNet's per-head log decay
  (chunk_size 64), heads-first inputs; the default ``recompute=True`` (memory-lean: backward recomputes per segment);
- ``chunk_autograd``: the same with ``recompute=False`` (plain autograd through every op: the oracle, and the form
  before issue 13); not in the default ``--impls``;
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)``, heads-first;
- ``fla_naive_chunk``: ``fla.ops.simple_gla.naive.naive_chunk_simple_gla`` (chunk 64) with the same decay as a
  per-step ``g`` (B, T, H), seq-first inputs created contiguous (no layout cost timed); only with the dev extra;
- ``chunk_step``: ``linear_attention_chunk`` with the same decay given per step (B, H, T): the like-for-like
  comparison with ``fla_naive_chunk`` (``chunk`` uses the constant-decay shortcut, one (C, C) matrix for all chunks);
- ``chunk_gla``: ``linear_attention_chunk`` with a data-dependent per-key-dim decay (B, H, T, K) (GLA, LightNet;
  state-carried chunks of 8 tokens).

Modes: ``fwd`` (under ``torch.no_grad()``) and ``fwdbwd`` (forward, then backward of a fixed random cotangent;
query/key/value require grad). Every (impl, length, mode) runs in its own process (this script with ``--child``):
inputs are made, one 256-token warm-up call runs, then ``--repeats`` timed calls (``--long-repeats`` at 16384).
The child reports the wall and CPU times (``time.process_time``), their medians, RSS after the warm-up and the peak RSS of the timed calls
(``VmHWM`` reset through ``/proc/self/clear_refs`` after the warm-up): peak memory of a form = peak minus RSS
before, in MiB (it includes the inputs' gradients in ``fwdbwd``). Threads: ``--threads`` (default 1: the machine
is shared, and two OpenMP threads stall badly under foreign load; the same setting for every implementation).
``os.getloadavg()`` is recorded before and after each child. Results go to ``--json`` after every child.

Growth check: separate processes at different moments see different foreign load on a shared machine, which can
distort ``t(2n)/t(n)``. So afterwards one more child per mode times the chunk form at every length >= 2048 in one
process, lengths interleaved within each of ``--growth-repeats`` repeats, and reports those medians and ratios.

    python benchmarks/linear_attention.py --long-repeats 3 --markdown   # the table in docs/benchmarks.md
    python benchmarks/linear_attention.py --impls chunk_autograd --lengths 16384 --modes fwdbwd --long-repeats 3 \
        --growth-repeats 0 --json bench-results/linear_attention_autograd.json   # the "before" memory
    python benchmarks/linear_attention.py --lengths 1024 2048 --repeats 2   # smoke test
    python benchmarks/linear_attention.py --render bench-results/linear_attention.json --markdown

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
import time
from pathlib import Path
from typing import Any

IMPLS = ("chunk", "sdpa", "fla_naive_chunk", "chunk_step", "chunk_gla", "chunk_autograd")
DEFAULT_IMPLS = IMPLS[:-1]
MODES = ("fwd", "fwdbwd")
HEADS, HEAD_DIM, CHUNK, WARMUP_LEN = 8, 64, 64, 256
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_overhead import machine_header as shared_machine_header  # noqa: E402


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _minor_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh memory: one per 4 KiB page)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0), so the peak excludes import-time transients; False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _make(impl: str, length: int):
    """Inputs and a zero-argument callable returning the output for one implementation."""
    import torch
    import torch.nn.functional as F

    from attnlab.functional.linear_attention import linear_attention_chunk

    g = torch.Generator().manual_seed(length)
    seq_first = impl == "fla_naive_chunk"
    shape = (1, length, HEADS, HEAD_DIM) if seq_first else (1, HEADS, length, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    log_decay = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(HEADS, dtype=torch.float64))).float()
    if impl in ("chunk", "chunk_autograd"):
        recompute = impl == "chunk"
        return (q, k, v), lambda q, k, v: linear_attention_chunk(q, k, v, log_decay, chunk_size=CHUNK,
                                                                 recompute=recompute)[0]
    if impl == "chunk_step":
        steps = log_decay[None, :, None].expand(1, HEADS, length).contiguous()  # (B, H, T)
        return (q, k, v), lambda q, k, v: linear_attention_chunk(q, k, v, steps, chunk_size=CHUNK)[0]
    if impl == "chunk_gla":
        gk = F.logsigmoid(torch.randn(1, HEADS, length, HEAD_DIM, generator=g) + 3) / 16
        return (q, k, v), lambda q, k, v: linear_attention_chunk(q, k, v, gk, chunk_size=CHUNK)[0]
    if impl == "sdpa":
        return (q, k, v), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla

    g_steps = log_decay[None, None].expand(1, length, HEADS).contiguous()
    return (q, k, v), lambda q, k, v: naive_chunk_simple_gla(q, k, v, g_steps, chunk_size=CHUNK)[0]


def run_child(impl: str, length: int, mode: str, repeats: int, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    warm_inputs, warm_fn = _make(impl, WARMUP_LEN)
    inputs, fn = _make(impl, length)

    def call(tensors, f):
        if mode == "fwd":
            with torch.no_grad():
                f(*tensors)
            return
        leaves = [t.requires_grad_() for t in tensors]
        out = f(*leaves)
        out.backward(torch.ones_like(out).normal_(generator=torch.Generator().manual_seed(0)))

    call(warm_inputs, warm_fn)  # first, so lazy one-off allocations are not counted as the form's memory
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    times, cpu_times, faults = [], [], []
    for _ in range(repeats):
        for t in inputs:
            t.grad = None
        start, cpu_start, faults_start = time.perf_counter(), time.process_time(), _minor_faults()
        call(inputs, fn)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        faults.append(_minor_faults() - faults_start)
    peak = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"times_s": times, "median_s": statistics.median(times), "cpu_times_s": cpu_times,
            "median_cpu_s": statistics.median(cpu_times), "median_minor_faults": statistics.median(faults),
            "rss_before_kib": rss_before,
            "peak_rss_kib": peak, "peak_extra_mib": round((peak - rss_before) / 1024, 1), "peak_reset": reset}


def run_growth_child(mode: str, lengths: list[int], repeats: int, threads: int) -> dict[str, Any]:
    """Chunk form at every length in one process, lengths interleaved within each repeat, so a change of the
    machine's load hits all lengths alike: the growth ratios t(2n)/t(n) are then comparable."""
    import torch

    torch.set_num_threads(threads)
    cases = {length: _make("chunk", length) for length in lengths}
    times: dict[int, list[float]] = {length: [] for length in lengths}
    cpu_times: dict[int, list[float]] = {length: [] for length in lengths}
    faults: dict[int, list[int]] = {length: [] for length in lengths}
    for _ in range(repeats):
        for length, (inputs, fn) in cases.items():
            for t in inputs:
                t.grad = None
                t.requires_grad_(mode == "fwdbwd")
            start, cpu_start, faults_start = time.perf_counter(), time.process_time(), _minor_faults()
            if mode == "fwd":
                with torch.no_grad():
                    fn(*inputs)
            else:
                out = fn(*inputs)
                out.backward(torch.ones_like(out))
            times[length].append(time.perf_counter() - start)
            cpu_times[length].append(time.process_time() - cpu_start)
            faults[length].append(_minor_faults() - faults_start)
    medians = {length: statistics.median(ts) for length, ts in times.items()}
    cpu = {length: statistics.median(ts) for length, ts in cpu_times.items()}
    return {"mode": mode, "repeats": repeats, "median_s": {str(k): v for k, v in medians.items()},
            "median_cpu_s": {str(k): v for k, v in cpu.items()},
            "median_minor_faults": {str(k): statistics.median(v) for k, v in faults.items()},
            "growth": {str(n): medians[n] / medians[n // 2] for n in lengths if n // 2 in medians},
            "growth_cpu": {str(n): cpu[n] / cpu[n // 2] for n in lengths if n // 2 in cpu}}


def run_one(impl: str, length: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    repeats = args.long_repeats if length >= 16384 and args.long_repeats else args.repeats
    base = {"impl": impl, "seq_len": length, "mode": mode, "repeats": repeats, "loadavg_before": os.getloadavg()}
    cmd = [sys.executable, __file__, "--child", impl, "--length", str(length), "--mode", mode,
           "--repeats", str(repeats), "--threads", str(args.threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {**base, "ok": False, "reason": f"timeout after {args.timeout} s", "loadavg_after": os.getloadavg()}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {**base, "ok": False, "reason": f"exit {done.returncode}: {done.stderr[-400:]}",
                "loadavg_after": os.getloadavg()}
    return {**json.loads(lines[-1]), **base, "ok": True, "loadavg_after": os.getloadavg()}


def machine_header(threads: int) -> dict[str, Any]:
    """probe_overhead's machine header (CPU, memory, versions, commit), plus fla's version and this run's shape."""
    import torch

    try:
        import fla
        fla_version = getattr(fla, "__version__", "installed")
    except Exception:  # noqa: BLE001 - fla missing or its triton import failing both mean "not available"
        fla_version = None
    torch.set_num_threads(threads)  # the parent does no timing; the header then states the children's setting
    return {**shared_machine_header(), "benchmark": "linear_attention", "fla": fla_version,
            "loadavg_start": os.getloadavg(),
            "shape": {"batch": 1, "num_heads": HEADS, "head_dim": HEAD_DIM, "chunk_size": CHUNK, "dtype": "float32"}}


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (seq_len, mode): median wall/CPU seconds and peak extra MiB per impl, fla's time over each chunk
    variant's (> 1: ours faster), SDPA's over chunk, and the chunk form's growth t(n)/t(n/2) across processes."""
    cell = {(r["seq_len"], r["mode"], r["impl"]): r for r in results if r.get("ok")}
    rows = []
    for length, mode in sorted({(r["seq_len"], r["mode"]) for r in results}, key=lambda x: (x[1], x[0])):
        row: dict[str, Any] = {"seq_len": length, "mode": mode}
        for impl in IMPLS:
            r = cell.get((length, mode, impl))
            row[f"{impl}_s"] = r["median_s"] if r else None
            row[f"{impl}_cpu_s"] = r.get("median_cpu_s") if r else None
            row[f"{impl}_mib"] = r["peak_extra_mib"] if r else None
        chunk = row["chunk_s"]
        row["sdpa_over_chunk"] = row["sdpa_s"] / chunk if chunk and row["sdpa_s"] else None
        for impl in ("chunk", "chunk_step"):
            fla, ours = row["fla_naive_chunk_s"], row[f"{impl}_s"]
            row[f"fla_over_{impl}"] = fla / ours if fla and ours else None
        half = cell.get((length // 2, mode, "chunk"))
        row["chunk_growth"] = chunk / half["median_s"] if chunk and half else None
        rows.append(row)
    return rows


def render(rows: list[dict[str, Any]], markdown: bool) -> str:
    """Seconds as ``wall (CPU)``; columns of implementations that were not run are left out."""
    def fmt(value: Any, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    def seconds(r: dict[str, Any], impl: str) -> str:
        wall, cpu = r[f"{impl}_s"], r[f"{impl}_cpu_s"]
        return "—" if wall is None else f"{wall:.3f}" + ("" if cpu is None else f" ({cpu:.3f})")

    ran = [impl for impl in IMPLS if any(r[f"{impl}_s"] is not None for r in rows)]
    head = ["mode", "seq_len", *(f"{impl} s" for impl in ran), *(f"{impl} MiB" for impl in ran)]
    body = [[r["mode"], str(r["seq_len"]), *(seconds(r, impl) for impl in ran),
             *(fmt(r[f"{impl}_mib"], ".0f") for impl in ran)] for r in rows]
    for key, title in (("sdpa_over_chunk", "sdpa/chunk"), ("fla_over_chunk", "fla/chunk"),
                       ("fla_over_chunk_step", "fla/chunk_step"), ("chunk_growth", "chunk t(n)/t(n/2)")):
        if any(r[key] is not None for r in rows):
            head.append(title)
            for line, r in zip(body, rows):
                line.append(fmt(r[key], ".2f"))
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head, *body])


def render_growth(growth: list[dict[str, Any]], markdown: bool) -> str:
    """The interleaved growth check: one row per (mode, seq_len) with the chunk form's median and t(n)/t(n/2)."""
    def ratio(g: dict[str, Any], key: str, n: str) -> str:
        return f"{g[key][n]:.2f}" if n in g.get(key, {}) else "—"

    rows = [[g["mode"], n, f"{t:.3f}", f"{g['median_cpu_s'][n]:.3f}" if "median_cpu_s" in g else "—",
             ratio(g, "growth", n), ratio(g, "growth_cpu", n), f"{g.get('median_minor_faults', {}).get(n, '—')}"]
            for g in growth if "median_s" in g for n, t in g["median_s"].items()]
    if not rows:
        return ""
    head = ["mode", "seq_len", "chunk wall s (interleaved)", "chunk CPU s", "wall t(n)/t(n/2)", "CPU t(n)/t(n/2)",
            "minor faults"]
    if markdown:
        return "\n".join(["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(r) + " |" for r in rows])
    return "\n".join(["", *("  ".join(r) for r in [head, *rows])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(DEFAULT_IMPLS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeats", type=int, default=5, help="timed calls per child; the median is reported")
    p.add_argument("--long-repeats", type=int, default=None, help="timed calls at 16384 (default: --repeats)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every child")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a child is killed")
    p.add_argument("--json", type=Path, default=REPO / "bench-results" / "linear_attention.json")
    p.add_argument("--markdown", action="store_true", help="print the table in markdown (for docs/benchmarks.md)")
    p.add_argument("--render", type=Path, metavar="JSON", help="only print the table of an existing JSON file")
    p.add_argument("--growth-repeats", type=int, default=7,
                   help="repeats of the interleaved growth check (chunk form, lengths >= 2048); 0 skips it")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--child-growth", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_growth:
        lengths = [n for n in args.lengths if n >= 2048]
        print(json.dumps(run_growth_child(args.child_growth, lengths, args.repeats, args.threads)), flush=True)
        return 0
    if args.child:
        print(json.dumps(run_child(args.child, args.length, args.mode, args.repeats, args.threads)), flush=True)
        return 0
    if args.render:
        if not args.render.is_file():
            p.error(f"--render expects a saved JSON run of this script; not found: {args.render}")
        doc = json.loads(args.render.read_text())
        print(render(summarise(doc["results"]), args.markdown))
        print(render_growth(doc.get("growth", []), args.markdown))
        return 0
    doc = {"machine": {**machine_header(args.threads), "argv": sys.argv[1:]}, "results": []}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for mode in args.modes:
        for length in args.lengths:
            for impl in args.impls:
                result = run_one(impl, length, mode, args)
                doc["results"].append(result)
                args.json.write_text(json.dumps(doc, indent=1))
                status = f"{result['median_s']:.3f} s" if result.get("ok") else result["reason"]
                print(f"[{time.perf_counter() - started:6.0f} s] {mode} {length} {impl}: {status}", file=sys.stderr)
    for mode in args.modes if args.growth_repeats else ():
        cmd = [sys.executable, __file__, "--child-growth", mode, "--repeats", str(args.growth_repeats),
               "--threads", str(args.threads), "--lengths", *map(str, args.lengths)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        growth = json.loads(lines[-1]) if lines else {"mode": mode, "error": done.stderr[-400:]}
        doc.setdefault("growth", []).append(growth)
        args.json.write_text(json.dumps(doc, indent=1))
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["machine"]["total_s"] = round(time.perf_counter() - started, 1)
    args.json.write_text(json.dumps(doc, indent=1))
    print(render(summarise(doc["results"]), args.markdown))
    print(render_growth(doc.get("growth", []), args.markdown))
    failed = [r for r in doc["results"] if not r.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
