"""Forward time of sparse attention masks vs their density: dense masked SDPA vs compiled Flex vs dense SDPA.

Shapes: batch 1, 8 heads, head_dim 64, float32, CPU, lengths 4096 8192 16384 (``--lengths``). Masks
(``attnlab.functional.masks`` / ``sparse_masks``):

- ``sliding_window(512)``, ``sliding_window(2048)``: causal window (q − kv < W);
- ``sink_window(4, 1020)``: StreamingLLM, 4 sinks + 1020-token window;
- ``ls_heads(512, 4)``: 4 local heads (window 512) + 4 global causal heads (head-dependent mask; its dense masked
  SDPA is two calls, the local heads with the (L, L) window mask and the global heads with ``is_causal``);
- ``radial(L/256 frames × 256 tokens)``: bidirectional video layout, O(n log n) density, token level;
- ``radial(..., block_size=128)``: the same coarsened to whole 128 × 128 tiles by the paper's block rule.

Per (length, mask): ``build_dense_s`` (the (1, H|1, L, L) bool mask for SDPA), ``build_block_s`` (attnlab's chunked
block-mask builder, 128 × 128 tiles), ``compile_s`` (first compiled Flex call, compile included), and median forward
seconds of ``dense_masked`` (``F.scaled_dot_product_attention`` with the bool mask) and ``flex`` (the compiled
``flex_attention`` with the block mask). Per length the baselines ``sdpa_causal`` (``is_causal=True``) and
``sdpa_full`` (no mask). ``density`` is the kept fraction of all L × L pairs (× heads); ``density_vs_base`` is the
kept fraction of the pairs the matching dense baseline computes (the causal triangle for causal masks, the full
square for ``radial``). Target (issue 6): speedup of flex over the dense baseline ≥ 0.5 / density at 16k (the
issue's "0.5 × 1/density", density of all L × L pairs). ``dense_masked`` is raw SDPA with the bool mask (what
``masked_attention(path="dense")`` calls, without its mask building and empty-row handling).
Flex output is checked against dense masked SDPA (max abs difference) at every length.

Everything runs in one process (Flex needs its compiled kernels warm); repeats: ``--repeats`` at 4096,
``--long-repeats`` above it. ``os.getloadavg()`` is recorded before and after (the machine is shared).

    python benchmarks/sparse_attention.py                         # the run in docs/benchmarks.md (~8 min)
    python benchmarks/sparse_attention.py --lengths 1024 --repeats 1        # smoke test (~1 min)
    python benchmarks/sparse_attention.py --render bench-results/sparse_attention.json \
        bench-results/sparse_attention_radial_block.json --markdown     # reprint (several runs: one table)

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
    if name == "radial_256":
        return S.radial(length // 256, 256), False
    if name == "radial_256_block128":
        return S.radial(length // 256, 256, block_size=BLOCK), False
    raise ValueError(f"unknown mask {name!r}")


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def run_length(length: int, repeats: int, masks: tuple[str, ...]) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from attnlab.functional.masked_attention import build_block_mask
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
            times = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), repeats)
            rows.append({"length": length, "config": base, "forward_s": times})
            print(f"  {length} {base}: {statistics.median(times):.3f} s", file=sys.stderr, flush=True)
        for name in masks:
            mask_mod, is_causal = make_mask(name, length)
            row: dict[str, Any] = {"length": length, "config": name, "causal": is_causal}
            heads = 8 if name.startswith("ls_heads") else 1
            kept = density(mask_mod, 1, heads, length, length, rows_per_chunk=512)
            row["density"] = kept
            row["density_vs_base"] = kept * length / ((length + 1) / 2) if is_causal else kept
            start = time.perf_counter()
            # ls_heads: one (L, L) window mask for the 4 local heads + is_causal for the 4 global heads (two SDPA
            # calls); a per-head (8, L, L) mask would need 8 GiB once SDPA turns it into a float bias at 16k
            keep = to_dense(mask_mod, 1, 1, length, length).contiguous()
            row["build_dense_s"] = time.perf_counter() - start

            def dense():
                if heads == 1:
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
                local = F.scaled_dot_product_attention(q[:, :4], k[:, :4], v[:, :4], attn_mask=keep)
                return torch.cat([local, F.scaled_dot_product_attention(q[:, 4:], k[:, 4:], v[:, 4:],
                                                                        is_causal=True)], dim=1)

            row["dense_masked_s"] = _time(dense, repeats)
            dense_out = dense() if length <= 8192 else None
            del keep
            start = time.perf_counter()
            block_mask = build_block_mask(mask_mod, 1, HEADS, length, length, block_size=BLOCK)
            row["build_block_s"] = time.perf_counter() - start
            row["block_density"] = float(
                (block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()).item()
                / (block_mask.kv_num_blocks.shape[1] * (-(-length // BLOCK)) ** 2))
            start = time.perf_counter()
            out = flex(q, k, v, block_mask=block_mask)
            row["compile_s"] = time.perf_counter() - start
            row["flex_s"] = _time(lambda: flex(q, k, v, block_mask=block_mask), repeats)
            if dense_out is not None:
                row["max_abs_diff_vs_dense"] = float((out - dense_out).abs().max())
            rows.append(row)
            print(f"  {length} {name}: density {kept:.4f} dense {statistics.median(row['dense_masked_s']):.3f} s "
                  f"flex {statistics.median(row['flex_s']):.3f} s (build {row['build_block_s']:.2f} s, compile "
                  f"{row['compile_s']:.1f} s)", file=sys.stderr, flush=True)
    return rows


def machine_header() -> dict[str, Any]:
    """The shared machine/version header (benchmarks/probe_overhead.py) plus this benchmark's settings."""
    return {**shared_machine_header(), "benchmark": "sparse_attention", "heads": HEADS, "head_dim": HEAD_DIM,
            "block_size": BLOCK, "dtype": "float32", "batch": 1, "dynamo_recompile_limit": RECOMPILE_LIMIT}


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (length, mask) with medians, speedups over the baselines and the target check."""
    base = {(r["length"], r["config"]): statistics.median(r["forward_s"]) for r in results if "forward_s" in r}
    out = []
    for r in results:
        if "flex_s" not in r:
            continue
        flex, dense = statistics.median(r["flex_s"]), statistics.median(r["dense_masked_s"])
        baseline = base[(r["length"], "sdpa_causal" if r["causal"] else "sdpa_full")]
        speedup = baseline / flex
        target = 0.5 / r["density"]  # the formula: 0.5 × 1/density
        out.append({**{k: r[k] for k in ("length", "config", "density", "density_vs_base", "block_density",
                                          "build_dense_s", "build_block_s", "compile_s")},
                    "max_abs_diff_vs_dense": r.get("max_abs_diff_vs_dense"),
                    "baseline": "sdpa_causal" if r["causal"] else "sdpa_full", "baseline_s": baseline,
                    "sdpa_causal_s": base[(r["length"], "sdpa_causal")], "dense_masked_s": dense, "flex_s": flex,
                    "speedup_vs_baseline": speedup, "target_speedup": target, "target_met": speedup >= target})
    return out


def render(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ["length", "mask", "density", "vs base", "causal SDPA s", "base", "SDPA+bool mask s", "flex s",
            "speedup", "target", "met", "block build s", "dense build s", "compile s", "max |Δ|"]
    body = []
    for r in rows:
        diff = r["max_abs_diff_vs_dense"]
        body.append([str(r["length"]), r["config"], f"{r['density']:.4f}", f"{r['density_vs_base']:.4f}",
                     f"{r['sdpa_causal_s']:.2f}", r["baseline"].replace("sdpa_", ""), f"{r['dense_masked_s']:.2f}",
                     f"{r['flex_s']:.2f}", f"{r['speedup_vs_baseline']:.1f}x", f"{r['target_speedup']:.1f}x",
                     "yes" if r["target_met"] else "no", f"{r['build_block_s']:.2f}", f"{r['build_dense_s']:.2f}",
                     f"{r['compile_s']:.1f}", "-" if diff is None else f"{diff:.1e}"])
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
    p.add_argument("--masks", nargs="+", default=list(MASK_NAMES), choices=MASK_NAMES)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats at lengths <= 4096")
    p.add_argument("--long-repeats", type=int, default=1, help="timed repeats above 4096")
    p.add_argument("--json", type=Path, default=REPO / "bench-results" / "sparse_attention.json")
    p.add_argument("--render", type=Path, nargs="+", help="print the table of existing JSON runs and exit (each "
                   "run against its own baselines, rows ordered by length)")
    p.add_argument("--markdown", action="store_true", help="print the table in markdown (for docs/benchmarks.md)")
    args = p.parse_args(argv)
    if args.render:
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
        data["results"] += run_length(length, repeats, tuple(args.masks))
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
