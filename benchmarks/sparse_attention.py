"""Forward time of sparse attention masks vs their density: attnlab's block-gather path vs dense SDPA baselines.

Shapes: batch 1, 8 heads (8 kv heads), head_dim 64, float32, CPU, lengths 4096 8192 16384 (``--lengths``). Masks
(``attnlab.functional.masks`` / ``sparse_masks``):

- ``sliding_window(512)``, ``sliding_window(2048)``: causal window (q − kv < W);
- ``sink_window(4, 1020)``: StreamingLLM, 4 sinks + 1020-token window;
- ``ls_heads(512, 4)``: 4 local heads (window 512) + 4 global causal heads (head-dependent mask);
- ``radial(L/256 frames × 256 tokens)``: bidirectional video layout, O(n log n) density, token level (not in the
  default run);
- ``radial(..., block_size=128)``: the same coarsened to whole 128 × 128 tiles by the paper's block rule.

Per length the baselines ``sdpa_causal`` (``is_causal=True``) and ``sdpa_full`` (no mask). Per (length, mask):
``density`` (kept fraction of all L × L pairs, × heads), ``tile_fraction`` (kept 128 × 128 tiles / all tiles),
``build_plan_s`` (the block plan, built once per length and cached), and median wall and process-CPU seconds of the
paths in ``--paths``: ``block`` (``masked_attention(path="block")`` with a warm plan cache), ``dense`` (raw
``F.scaled_dot_product_attention`` with the materialised bool mask; ``ls_heads`` as two calls, local heads with the
(L, L) window mask and global heads with ``is_causal``), ``flex`` (``torch.compile(flex_attention)`` with attnlab's
block mask; compile time in ``compile_s``). Target (issue 13): speedup of the block path over the dense baseline
(causal SDPA for causal masks, full SDPA for radial) ≥ 0.5 / density at 16k, in wall and CPU time. The block output
is checked against ``masked_attention(path="dense")`` (max abs difference) at lengths ≤ ``--check-up-to``.

Everything runs in one process; repeats: ``--repeats`` at 4096, ``--long-repeats`` above it (medians).
``os.getloadavg()`` is recorded before and after (the machine is shared).

    python benchmarks/sparse_attention.py --markdown                         # the run in docs/benchmarks.md
    python benchmarks/sparse_attention.py --lengths 1024 --repeats 1        # smoke test (~10 s)
    python benchmarks/sparse_attention.py --paths block flex --masks sliding_window_512   # with compiled Flex
    python benchmarks/sparse_attention.py --render bench-results/sparse_attention.json --markdown   # reprint

This file is not part of the attnlab package and is never imported by it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_overhead import machine_header as shared_machine_header  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HEADS, HEAD_DIM, BLOCK = 8, 64, 128
RECOMPILE_LIMIT = 64
MASK_NAMES = ("sliding_window_512", "sliding_window_2048", "sink_window_4_1020", "ls_heads_512_4", "radial_256",
              "radial_256_block128")
DEFAULT_MASKS = ("sliding_window_512", "sliding_window_2048", "sink_window_4_1020", "ls_heads_512_4",
                 "radial_256_block128")


def make_mask(name: str, length: int):
    from attnlab.functional import masks as M
    from attnlab.functional import sparse_masks as S

    if name == "sliding_window_512":
        return M.sliding_window(512), True
    if name == "sliding_window_2048":
        return M.sliding_window(2048), True
    if name == "sink_window_4_1020":
        return M.MASKS.get("sink_window")(num_sink_tokens=4, window=1020), True
    if name == "ls_heads_512_4":
        return M.ls_heads(512, 4), True
    frames = -(-length // 256)  # whole 256-token frames covering the length (the mask is checked to cover it)
    if name == "radial_256":
        return S.radial(frames, 256), False
    if name == "radial_256_block128":
        return S.radial(frames, 256, block_size=BLOCK), False
    raise ValueError(f"unknown mask {name!r}")


def _time(fn, repeats: int) -> tuple[list[float], list[float]]:
    """(wall seconds, process CPU seconds) of ``repeats`` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def run_length(length: int, repeats: int, masks: tuple[str, ...], paths: tuple[str, ...],
               check_up_to: int, block_size: int = BLOCK) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from attnlab.functional.masked_attention import BlockMaskCache, build_block_mask, masked_attention
    from attnlab.functional.masks import density, to_dense

    # every (mask, length) is its own compiled kernel; dynamo's default limit (8 per function) would silently send
    # later cases to the slow unfused eager Flex, so the benchmark raises it (recorded in the JSON header)
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    flex = torch.compile(flex_attention, dynamic=False)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, generator=g) for _ in range(3))
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for base in ("sdpa_causal", "sdpa_full"):
            causal = base == "sdpa_causal"
            F.scaled_dot_product_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], is_causal=causal)  # warm
            wall, cpu = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), repeats)
            rows.append({"length": length, "config": base, "forward_s": wall, "forward_cpu_s": cpu})
            print(f"  {length} {base}: {statistics.median(wall):.3f} s", file=sys.stderr, flush=True)
        for name in masks:
            mask_mod, is_causal = make_mask(name, length)
            row: dict[str, Any] = {"length": length, "config": name, "causal": is_causal}
            heads = 8 if name.startswith("ls_heads") else 1
            kept = density(mask_mod, 1, heads, length, length, rows_per_chunk=512)
            row["density"] = kept
            row["density_vs_base"] = kept * length / ((length + 1) / 2) if is_causal else kept
            reference = None
            if length <= check_up_to:  # the dense path (SDPA with the materialised mask) as the oracle
                reference = masked_attention(q, k, v, mask_mod)
            if "block" in paths:
                cache = BlockMaskCache(block_size=block_size)
                start = time.perf_counter()
                plan = cache.plan(mask_mod, 1, HEADS, HEADS, length, length)
                row["build_plan_s"] = time.perf_counter() - start
                row["tile_fraction"] = plan.tile_fraction
                row["plan_groups"] = [f"{group.kind}:{group.heads.numel()}h:{len(group.buckets)}b"
                                      for group in plan.batch_rows[0]]
                out = masked_attention(q, k, v, mask_mod, path="block", cache=cache)  # warm-up
                row["block_s"], row["block_cpu_s"] = _time(
                    lambda: masked_attention(q, k, v, mask_mod, path="block", cache=cache), repeats)
                if reference is not None:
                    row["block_max_abs_diff"] = float((out - reference).abs().max())
            if "dense" in paths:
                # ls_heads: one (L, L) window mask for the 4 local heads + is_causal for the 4 global heads (two SDPA
                # calls); a per-head (8, L, L) mask would need 8 GiB once SDPA turns it into a float bias at 16k
                keep = to_dense(mask_mod, 1, 1, length, length).contiguous()

                def dense():
                    if heads == 1:
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
                    local = F.scaled_dot_product_attention(q[:, :4], k[:, :4], v[:, :4], attn_mask=keep)
                    return torch.cat([local, F.scaled_dot_product_attention(q[:, 4:], k[:, 4:], v[:, 4:],
                                                                            is_causal=True)], dim=1)

                row["dense_masked_s"], row["dense_masked_cpu_s"] = _time(dense, repeats)
                del keep
            if "flex" in paths:
                start = time.perf_counter()
                block_mask = build_block_mask(mask_mod, 1, HEADS, length, length, block_size=BLOCK)
                row["build_block_s"] = time.perf_counter() - start
                start = time.perf_counter()
                out = flex(q, k, v, block_mask=block_mask)
                row["compile_s"] = time.perf_counter() - start
                row["flex_s"], row["flex_cpu_s"] = _time(lambda: flex(q, k, v, block_mask=block_mask), repeats)
                if reference is not None:
                    row["flex_max_abs_diff"] = float((out - reference).abs().max())
            rows.append(row)
            done = {key: statistics.median(row[key]) for key in ("block_s", "dense_masked_s", "flex_s") if key in row}
            print(f"  {length} {name}: density {kept:.4f} " + " ".join(f"{key} {value:.3f}" for key, value
                                                                        in done.items()), file=sys.stderr, flush=True)
    return rows


def machine_header() -> dict[str, Any]:
    """The shared machine/version header (benchmarks/probe_overhead.py) plus this benchmark's settings."""
    return {**shared_machine_header(), "benchmark": "sparse_attention", "heads": HEADS, "head_dim": HEAD_DIM,
            "block_size": BLOCK, "dtype": "float32", "batch": 1, "dynamo_recompile_limit": RECOMPILE_LIMIT}


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (length, mask) with medians, speedups of the block path over the baseline and the target check."""
    base = {(r["length"], r["config"]): (statistics.median(r["forward_s"]), statistics.median(r["forward_cpu_s"]))
            for r in results if "forward_s" in r}
    out = []
    for r in results:
        if "forward_s" in r:
            continue
        name = "sdpa_causal" if r["causal"] else "sdpa_full"
        wall, cpu = base[(r["length"], name)]
        row = {key: r.get(key) for key in ("length", "config", "density", "density_vs_base", "tile_fraction",
                                           "build_plan_s", "block_max_abs_diff", "compile_s")}
        row.update(baseline=name, baseline_s=wall, baseline_cpu_s=cpu, target_speedup=0.5 / r["density"])
        for path in ("block", "dense_masked", "flex"):
            if f"{path}_s" in r:
                row[f"{path}_s"] = statistics.median(r[f"{path}_s"])
                row[f"{path}_cpu_s"] = statistics.median(r[f"{path}_cpu_s"])
        if "block_s" in row:
            row["speedup"] = wall / row["block_s"]
            row["speedup_cpu"] = cpu / row["block_cpu_s"]
            row["target_met"] = row["speedup"] >= row["target_speedup"] and row["speedup_cpu"] >= row["target_speedup"]
        out.append(row)
    return out


def render(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ["length", "mask", "density", "tiles", "base", "base s", "block s", "base CPU s", "block CPU s",
            "speedup", "speedup (CPU)", "target", "met", "plan build s", "SDPA+bool s", "flex s", "max |Δ|"]

    def fmt(value, spec: str, suffix: str = "") -> str:
        return "-" if value is None else f"{value:{spec}}{suffix}"

    body = []
    for r in rows:
        body.append([str(r["length"]), r["config"], f"{r['density']:.4f}", fmt(r.get("tile_fraction"), ".4f"),
                     r["baseline"].replace("sdpa_", ""), f"{r['baseline_s']:.2f}", fmt(r.get("block_s"), ".3f"),
                     f"{r['baseline_cpu_s']:.2f}", fmt(r.get("block_cpu_s"), ".3f"),
                     fmt(r.get("speedup"), ".2f", "x"), fmt(r.get("speedup_cpu"), ".2f", "x"),
                     f"{r['target_speedup']:.2f}x", {True: "yes", False: "no", None: "-"}[r.get("target_met")],
                     fmt(r.get("build_plan_s"), ".2f"), fmt(r.get("dense_masked_s"), ".2f"),
                     fmt(r.get("flex_s"), ".2f"), fmt(r.get("block_max_abs_diff"), ".1e")])
    if markdown:
        lines = ["| " + " | ".join(h.replace("|", "\\|") for h in head) + " |",
                 "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head, *body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--masks", nargs="+", default=list(DEFAULT_MASKS), choices=MASK_NAMES)
    p.add_argument("--paths", nargs="+", default=["block"], choices=["block", "dense", "flex"],
                   help="attnlab's block path; raw SDPA with the bool mask; compiled Flex (slow to compile on CPU)")
    p.add_argument("--block-size", type=int, default=BLOCK,
                   help="tile side of the block path's plan (the radial block rule and Flex keep 128)")
    p.add_argument("--check-up-to", type=int, default=4096,
                   help="compare outputs with masked_attention(path='dense') at lengths up to this")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats at lengths <= 4096")
    p.add_argument("--long-repeats", type=int, default=3, help="timed repeats above 4096")
    p.add_argument("--json", type=Path, default=REPO / "bench-results" / "sparse_attention.json")
    p.add_argument("--render", type=Path, nargs="+", help="print the table of existing JSON runs and exit (each "
                   "run against its own baselines, rows ordered by length)")
    p.add_argument("--markdown", action="store_true", help="print the table in markdown (for docs/benchmarks.md)")
    args = p.parse_args(argv)
    if args.render:
        missing = [str(path) for path in args.render if not path.is_file()]
        if missing:
            p.error(f"--render expects saved JSON runs of this script; not found: {', '.join(missing)}")
        rows = [row for path in args.render for row in summarise(json.loads(path.read_text())["results"])]
        print(render(sorted(rows, key=lambda row: row["length"]), args.markdown))
        return 0
    data: dict[str, Any] = {"machine": machine_header(), "loadavg_before": os.getloadavg(),
                            "args": {k: v for k, v in vars(args).items() if k not in ("render", "markdown", "json")},
                            "results": []}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for length in args.lengths:
        repeats = args.repeats if length <= 4096 else args.long_repeats
        data["results"] += run_length(length, repeats, tuple(args.masks), tuple(args.paths), args.check_up_to,
                                      args.block_size)
        data["loadavg_after"] = os.getloadavg()
        data["total_s"] = time.perf_counter() - start
        tmp = args.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(args.json)
    print(render(summarise(data["results"]), args.markdown))
    print(f"total {data['total_s']:.0f} s; loadavg before {data['loadavg_before']}, after {data['loadavg_after']}; "
          f"JSON -> {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
