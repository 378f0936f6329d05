"""Cost of running attnlab's probes during a forward pass, against plain SDPA and eager ``output_attentions``.

Model: the bundled SmolLM2-135M, float32, CPU, batch 1, one window of real corpus tokens
(``attnlab.load_text(tokenizer, None, seq_len=N, max_windows=1)``). Configurations:

- ``sdpa``: plain ``model(**batch)`` with ``attn_implementation="sdpa"`` under ``torch.no_grad()``;
- ``attnlab``: the same forward inside ``attnlab.Session(model, probes=["entropy", "sink", "distance", "norms"])``
  (exact statistics from the fused probe kernel, the default);
- ``attnlab_blocked``: the same with ``probe_kernel="blocked"`` (the blocked kernel with per-block probes, the
  oracle the fused kernel is tested against; the default exact path before issue 13);
- ``attnlab_sampled``: as ``attnlab`` with ``query_fraction=0.125``. In the first repeat, at lengths up to
  ``--error-max``, the child then also runs the exact session on the same tokens (untimed, after the timed forward
  and its RSS reading) and reports the max/median absolute error over (layer, head) of ``entropy``,
  ``normalised_entropy``, ``alpha`` (position 0) and ``power_law_exponent``;
- ``eager_attentions``: ``attn_implementation="eager"`` with ``output_attentions=True`` (materialises
  layers x heads x L^2 floats), only up to ``--eager-max`` tokens.

Every (configuration, length, repeat) runs in its own process (this script with ``--child``), configurations
alternating within a repeat (order rotated each repeat). A child loads the model, runs one 64-token warm-up
forward in the same configuration, then times the measured forward alone (wall and process CPU seconds) and prints
one JSON line with them, peak RSS (``ru_maxrss``, KiB on Linux; includes loading, whose peak is below the
post-warm-up RSS), RSS right after loading and RSS just before the measured forward (after the warm-up, which
faults in the memory-mapped weights). A child that fails, times out (``--timeout``) or is killed (OOM killer, or
this script's ``--max-rss-gib`` guard) is recorded as failed with its reason and the RSS seen before the kill.
Thread count is torch's default unless ``--threads`` sets it (recorded per child as ``threads``). Results go to
``--json`` after every child, so an interrupted run keeps them.

    python benchmarks/probe_overhead.py --lengths 4096 --repeats 2 --threads 1 \
        --configs sdpa attnlab attnlab_blocked       # with the 16384 run below: docs/benchmarks.md, ~12 min
    python benchmarks/probe_overhead.py --lengths 16384 --repeats 1 --threads 1 --configs sdpa attnlab
    python benchmarks/probe_overhead.py --lengths 256 512 --repeats 1 --eager-max 512   # smoke test, ~3 min
    python benchmarks/probe_overhead.py --render bench-results/probe_overhead.json --markdown

This file is not part of the attnlab package and is never imported by it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS = ("sdpa", "attnlab", "attnlab_blocked", "attnlab_sampled", "eager_attentions")
PROBES = ["entropy", "sink", "distance", "norms"]
SAMPLED_FRACTION = 0.125
WARMUP_LEN = 64
LONG_FROM = 4096  # lengths above this use --long-repeats
ERROR_STATS = ("entropy", "normalised_entropy", "alpha", "power_law_exponent")
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------------------
# child: one measurement in a fresh process
# --------------------------------------------------------------------------------------------------------------
def _vm_rss_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _stats_by_head(frame: Any) -> dict[str, Any]:
    """statistic -> Series indexed by (layer, head) for the statistics whose sampling error is reported."""
    out = {}
    for stat in ERROR_STATS:
        rows = frame[frame["statistic"] == stat]
        if stat == "alpha":
            rows = rows[rows["position"] == 0]
        out[stat] = rows.set_index(["layer", "head"])["value"].astype(float)
    return out


def _sampling_error(exact: Any, sampled: Any) -> dict[str, Any]:
    exact_s, sampled_s = _stats_by_head(exact), _stats_by_head(sampled)
    errors = {}
    for stat in ERROR_STATS:
        a, b = exact_s[stat].align(sampled_s[stat], join="inner")
        diff = (a - b).abs()
        finite = diff.dropna()
        errors[stat] = {
            "max_abs": float(finite.max()) if len(finite) else None,
            "median_abs": float(finite.median()) if len(finite) else None,
            "exact_median": float(a.median()) if len(a) else None,
            "heads": int(len(finite)),
            "non_finite": int(len(diff) - len(finite)),
        }
    return errors


def run_child(config: str, length: int, model_name: str, with_error: bool, threads: int = 0) -> dict[str, Any]:
    """Load the model, warm up, time one forward of ``length`` tokens in ``config``; returns the JSON record.

    ``seconds`` is wall time and ``cpu_seconds`` process CPU time (all threads) of the measured forward alone.
    With ``with_error`` (attnlab_sampled only) the exact session then runs on the same tokens, untimed.
    """
    try:  # be the OOM killer's first choice, not somebody else's process
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    import torch

    import attnlab

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = attnlab.load_model(model_name, dtype="float32", device="cpu")
    model.eval()
    model.set_attn_implementation("eager" if config == "eager_attentions" else "sdpa")
    batch = next(iter(attnlab.load_text(tokenizer, None, seq_len=length, max_windows=1)))
    warm = {k: v[:, :WARMUP_LEN] for k, v in batch.items()}
    record: dict[str, Any] = {
        "config": config, "length": length, "threads": torch.get_num_threads(),
        "rss_after_load_kib": _vm_rss_kib(), "maxrss_after_load_kib": _maxrss_kib(),
    }

    kernel = "blocked" if config == "attnlab_blocked" else "fused"

    def session(fraction: float = 1.0) -> Any:
        return attnlab.Session(model, probes=PROBES, query_fraction=fraction, probe_kernel=kernel)

    with torch.no_grad():
        if config in ("sdpa", "eager_attentions"):
            kwargs = {"output_attentions": True} if config == "eager_attentions" else {}
            model(**warm, **kwargs)
            record["rss_before_forward_kib"], record["maxrss_after_warmup_kib"] = _vm_rss_kib(), _maxrss_kib()
            start, cpu = time.perf_counter(), time.process_time()
            out = model(**batch, **kwargs)
            record["seconds"], record["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
            record["loadavg_after"] = os.getloadavg()
            if config == "eager_attentions":
                record["attentions_bytes"] = sum(a.numel() * a.element_size() for a in out.attentions)
            del out
            record["maxrss_kib"] = _maxrss_kib()
        else:
            fraction = SAMPLED_FRACTION if config == "attnlab_sampled" else 1.0
            with session(fraction):
                model(**warm)
            record["rss_before_forward_kib"], record["maxrss_after_warmup_kib"] = _vm_rss_kib(), _maxrss_kib()
            with session(fraction) as timed:
                start, cpu = time.perf_counter(), time.process_time()
                out = model(**batch)
                record["seconds"], record["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
                record["loadavg_after"] = os.getloadavg()
            del out
            record["maxrss_kib"] = _maxrss_kib()  # before the untimed exact run below
            record["paths"] = sorted(set(timed.attention_paths.values()))
            start = time.perf_counter()
            sampled_frame = timed.results()
            record["results_seconds"] = time.perf_counter() - start
            if config == "attnlab_sampled" and with_error:
                with session(1.0) as exact:
                    start = time.perf_counter()
                    model(**batch)
                    record["exact_seconds"] = time.perf_counter() - start
                record["sampling_error"] = _sampling_error(exact.results(), sampled_frame)
    return record


# --------------------------------------------------------------------------------------------------------------
# parent: schedule children, collect, summarise
# --------------------------------------------------------------------------------------------------------------
def _read_status_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _tail(path: Path, chars: int = 600) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:].strip()


def run_one(config: str, length: int, args: argparse.Namespace, with_error: bool) -> dict[str, Any]:
    """Run one child; a failure (exit code, signal, timeout, memory cap, bad output) becomes a failed record."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", config, "--length", str(length),
           "--model", args.model, "--threads", str(args.threads), *(["--with-error"] if with_error else [])]
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TQDM_DISABLE": "1"}
    cap_kib = int(args.max_rss_gib * 1024 * 1024) if args.max_rss_gib else None
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = Path(tmp) / "out", Path(tmp) / "err"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            start = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
            reason, peak_seen = None, 0
            while True:
                try:
                    proc.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    pass
                rss = _read_status_rss_kib(proc.pid) or 0
                peak_seen = max(peak_seen, rss)
                if cap_kib and rss > cap_kib:
                    reason = f"killed by the benchmark: RSS {rss / 2**20:.1f} GiB > --max-rss-gib {args.max_rss_gib}"
                elif time.monotonic() - start > args.timeout:
                    reason = f"timed out after {args.timeout:.0f} s"
                if reason:
                    proc.kill()
                    proc.wait()
                    break
            wall = time.monotonic() - start
        base = {"config": config, "length": length, "ok": False, "child_wall_seconds": round(wall, 2),
                "observed_peak_rss_kib": peak_seen}
        if reason:
            return {**base, "reason": reason}
        if proc.returncode != 0:
            if proc.returncode < 0:
                name = signal.Signals(-proc.returncode).name
                why = f"killed by {name}" + (" (likely the OOM killer)" if name == "SIGKILL" else "")
            else:
                last = _tail(err_path).splitlines()
                why = f"exit code {proc.returncode}" + (f": {last[-1][:200]}" if last else "")
            return {**base, "reason": why, "stderr_tail": _tail(err_path)}
        lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith("{")]
        if not lines:
            return {**base, "reason": "child printed no JSON line", "stderr_tail": _tail(err_path)}
        return {**json.loads(lines[-1]), **base, "ok": True}


def machine_header() -> dict[str, Any]:
    import torch
    import transformers

    import attnlab

    cpu = None
    mem_kib = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {
        "benchmark": "probe_overhead",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "attnlab": attnlab.__version__, "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "hostname": platform.node(), "loadavg": os.getloadavg(),
    }


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (length, config): medians over successful repeats and ratios to sdpa at the same length."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["length"], r["config"]), []).append(r)
    rows = []
    for (length, config), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], CONFIGS.index(kv[0][1]))):
        ok = [r for r in runs if r["ok"]]
        row: dict[str, Any] = {"length": length, "config": config, "ok": len(ok), "runs": len(runs),
                               "failures": sorted({r["reason"] for r in runs if not r["ok"]})}
        if ok:
            row["seconds"] = statistics.median(r["seconds"] for r in ok)
            row["cpu_seconds"] = statistics.median(r["cpu_seconds"] for r in ok)
            loads = [r["loadavg_after"][0] for r in ok if r.get("loadavg_after")]
            row["load_1min"] = (min(loads), max(loads)) if loads else None
            row["peak_rss_mib"] = statistics.median(r["maxrss_kib"] for r in ok) / 1024
            row["rss_after_load_mib"] = statistics.median(r["rss_after_load_kib"] for r in ok) / 1024
            row["rss_before_forward_mib"] = statistics.median(r["rss_before_forward_kib"] for r in ok) / 1024
            with_error = [r for r in ok if "sampling_error" in r]
            if with_error:
                row["sampling_error"] = {
                    stat: {key: statistics.median(r["sampling_error"][stat][key] for r in with_error)
                           for key in ("max_abs", "median_abs", "exact_median")
                           if all(r["sampling_error"][stat][key] is not None for r in with_error)}
                    for stat in ERROR_STATS
                }
        else:
            seen = [r["observed_peak_rss_kib"] for r in runs if r.get("observed_peak_rss_kib")]
            if seen:
                row["observed_peak_rss_before_failure_mib"] = max(seen) / 1024
        rows.append(row)
    base = {r["length"]: r for r in rows if r["config"] == "sdpa" and "seconds" in r}
    for row in rows:
        ref = base.get(row["length"])
        if ref and "seconds" in row:
            row["time_ratio"] = row["seconds"] / ref["seconds"]
            row["cpu_ratio"] = row["cpu_seconds"] / ref["cpu_seconds"]
            row["rss_ratio"] = row["peak_rss_mib"] / ref["peak_rss_mib"]
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ["length", "config", "ok/runs", "median s", "x sdpa", "CPU s", "x sdpa CPU", "peak RSS MiB",
            "x sdpa RSS", "RSS before fwd MiB", "fwd +MiB", "load (1 min)"]
    body = []
    for r in rows:
        before = r.get("rss_before_forward_mib")
        increment = r["peak_rss_mib"] - before if before is not None else None
        body.append([str(r["length"]), r["config"], f"{r['ok']}/{r['runs']}", _fmt(r.get("seconds"), ".2f"),
                     _fmt(r.get("time_ratio"), ".2f"), _fmt(r.get("cpu_seconds"), ".1f"),
                     _fmt(r.get("cpu_ratio"), ".2f"), _fmt(r.get("peak_rss_mib"), ".0f"),
                     _fmt(r.get("rss_ratio"), ".2f"), _fmt(before, ".0f"), _fmt(increment, ".0f"),
                     "–".join(dict.fromkeys(f"{x:.1f}" for x in r["load_1min"])) if r.get("load_1min") else "—"])
    err_head = ["length", "statistic", "max abs error", "median abs error", "median exact value"]
    err_body = []
    for r in rows:
        for stat, e in (r.get("sampling_error") or {}).items():
            label = "alpha (position 0)" if stat == "alpha" else stat
            err_body.append([str(r["length"]), label, _fmt(e.get("max_abs"), ".4f"), _fmt(e.get("median_abs"), ".4f"),
                             _fmt(e.get("exact_median"), ".4f")])
    failures = [f"{r['length']} {r['config']}: {'; '.join(r['failures'])}"
                + (f" (highest RSS seen: {r['observed_peak_rss_before_failure_mib']:.0f} MiB)"
                   if "observed_peak_rss_before_failure_mib" in r else "") for r in rows if r["failures"]]
    parts = [_table(head, body, markdown)]
    if err_body:
        title = f"attnlab_sampled (query_fraction={SAMPLED_FRACTION}) vs exact attnlab, over (layer, head):"
        parts += ["", title, "", _table(err_head, err_body, markdown)]
    if failures:
        parts += ["", "Failures:", *(f"- {f}" for f in failures)]
    return "\n".join(parts)


def _table(head: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *(fmt(row) for row in body)])


def plan(args: argparse.Namespace) -> list[tuple[int, int, str]]:
    """(repeat, length, config) in run order: repeats outermost, configs alternating (rotated per repeat)."""
    jobs = []
    for repeat in range(max(args.repeats, args.long_repeats)):
        for length in args.lengths:
            if repeat >= (args.long_repeats if length > LONG_FROM else args.repeats):
                continue
            configs = [c for c in args.configs if not (c == "eager_attentions" and length > args.eager_max)]
            shift = repeat % len(configs) if configs else 0
            jobs += [(repeat, length, c) for c in configs[shift:] + configs[:shift]]
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384],
                   help="sequence lengths (eager_attentions only up to --eager-max)")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=3, help="processes per (config, length); the median is reported")
    p.add_argument("--long-repeats", type=int, default=None,
                   help=f"repeats for lengths > {LONG_FROM} (default: --repeats)")
    p.add_argument("--eager-max", type=int, default=4096, help="longest length run with eager_attentions")
    p.add_argument("--error-max", type=int, default=4096,
                   help="longest length at which attnlab_sampled also runs the exact session to report its error "
                        "(first repeat only; the statistics are deterministic)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a child is killed")
    p.add_argument("--max-rss-gib", type=float, default=20.0,
                   help="kill a child whose RSS exceeds this (0 = no cap; the OOM killer then decides)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per child (0: torch's default). On a shared machine 1 avoids measuring "
                        "thread contention: an op's parallel region waits for a descheduled thread")
    p.add_argument("--json", type=Path, default=REPO / "bench-results" / "probe_overhead.json")
    p.add_argument("--markdown", action="store_true", help="print the tables in markdown (for docs/benchmarks.md)")
    p.add_argument("--render", type=Path, metavar="JSON", help="only print the tables of an existing JSON file")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--with-error", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(args.child, args.length, args.model, args.with_error, args.threads)), flush=True)
        return 0
    if args.render:
        data = json.loads(args.render.read_text())
        print(render(summarise(data["results"]), args.markdown))
        return 0
    if args.long_repeats is None:
        args.long_repeats = args.repeats

    jobs = plan(args)
    header = machine_header()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("child", "length", "with_error", "render", "markdown")}
    data: dict[str, Any] = {"machine": header, "settings": {**settings, "probes": PROBES,
                            "sampled_query_fraction": SAMPLED_FRACTION, "warmup_len": WARMUP_LEN}, "results": []}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(jobs)} child runs; {header['cpu']}, {header['cores']} cores, torch {header['torch']}; "
          f"JSON -> {args.json}", file=sys.stderr, flush=True)
    started = time.monotonic()
    for i, (repeat, length, config) in enumerate(jobs, 1):
        with_error = config == "attnlab_sampled" and repeat == 0 and length <= args.error_max
        record = {**run_one(config, length, args, with_error), "repeat": repeat}
        data["results"].append(record)
        data["total_seconds"] = round(time.monotonic() - started, 1)
        tmp = args.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(args.json)  # saved after every child, so a partial run keeps what it measured
        status = f"{record['seconds']:.2f} s, peak {record['maxrss_kib'] / 1024:.0f} MiB" if record["ok"] \
            else f"FAILED: {record['reason']}"
        print(f"[{i}/{len(jobs)}] repeat {repeat} len {length} {config}: {status} "
              f"(child {record['child_wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
    data["summary"] = summarise(data["results"])
    args.json.write_text(json.dumps(data, indent=1))
    print(f"# probe_overhead {header['date']} | {header['cpu']} | {header['cores']} cores | torch {header['torch']} "
          f"| transformers {header['transformers']} | attnlab {header['attnlab']} | {(header['git_commit'] or '')[:10]}")
    print(render(data["summary"], args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
