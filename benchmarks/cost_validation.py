"""Predicted vs measured time of SmolLM2-135M greedy generation on this CPU: the Kinetics cost model validated.

What runs: transformers ``generate`` (greedy, the KV cache, ``attn_implementation="sdpa"``, float32, CPU, batch =
samples, the same prompt copied per sample) on real text (the bundled Shakespeare), for each (prompt_len, gen_len,
samples) cell (``--cells``; default prompts 128/1024/4096 × gen 64/256 and 2048/8192 × gen 64 at batch 1, plus
1024/64 at batch 4). A logits processor stamps wall (``perf_counter``) and process CPU (``process_time``) time each
time a token is chosen: ``prefill`` is the time to the first token (the prompt pass), each later gap is one decode
step (one forward of one new token per sample, plus generate's own bookkeeping). ``min_new_tokens =
max_new_tokens`` forces ``gen_len`` tokens.

What it predicts (``attnlab.cost``, kv_bytes = weight_bytes = 4 for float32), with this machine's peak FLOP/s and
read bandwidth measured just before each cell (``measure_accelerator``; the machine is shared and both drift):

- ``prefill``: :func:`attnlab.cost.prefill_cost` (the output head on the last position only);
- decode per token, ``kinetics``: :func:`attnlab.cost.attention_cost` with ``weight_bytes = 0`` (the paper's
  setting: weight loads amortised by batching), divided by the decode steps;
- decode per token, ``weights``: the same with ``weight_bytes = 4`` and ``batched=True`` (every float32 weight read
  once per decode step, shared by the batch's samples).

Decode per token is the median over the cell's steps (the mean is in the JSON; a neighbour's burst on the shared
2-core machine can stall single steps 10×). ``error = predicted / measured − 1`` per cell (wall time). ``weight floor`` (before each cell): one 1-token
``F.linear`` through every weight matrix of the model, nothing else: the weight reads of a decode step as this
machine runs them. A least-squares line through the batch-1 decode steps (the median of each run of 64 steps),
``t(context) = fixed + per_key·context``, splits the measured step into a context-independent part (weights,
per-op overhead) and the part that grows with the KV cache (attention, cache append); it is set against the model's
KV slope ``kv_bytes·2·n_kv·d / bandwidth + 4·n_q·d / peak``.

One process (the model loads once); ``os.getloadavg()`` before and after (the machine is shared).

    python benchmarks/cost_validation.py                                   # the docs run (~7 min on 2 cores)
    python benchmarks/cost_validation.py --cells 128:16:1 256:16:1         # smoke test (~30 s)
    python benchmarks/cost_validation.py --render bench-results/cost_validation.json --markdown
    python benchmarks/cost_validation.py --cells 128:64:1 --json bench-results/cost_validation_rerun.json
    python benchmarks/cost_validation.py --render bench-results/cost_validation.json \
        bench-results/cost_validation_rerun.json --markdown       # the rerun cell replaces the first one (marked *)
    python benchmarks/cost_validation.py --family qwen3        # the cost model over a model family (no timing)
    python benchmarks/cost_validation.py --profile-decode 4096  # operators of 5 decode steps at 4096 context

This file is not part of the attnlab package and is never imported by it.
"""

from __future__ import annotations

import argparse
import dataclasses
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
DEFAULT_CELLS = ("128:64:1", "128:256:1", "1024:64:1", "1024:256:1", "2048:64:1", "4096:64:1", "4096:256:1",
                 "8192:64:1", "1024:64:4")
BYTES = 4  # float32 weights and KV


def parse_cell(text: str) -> tuple[int, int, int]:
    try:
        prompt_len, gen_len, samples = (int(part) for part in text.split(":"))
    except ValueError:
        raise SystemExit(f"--cells expects PROMPT:GEN:SAMPLES integers, got {text!r}") from None
    if prompt_len < 1 or gen_len < 2 or samples < 1:
        raise SystemExit(f"--cells expects PROMPT >= 1, GEN >= 2, SAMPLES >= 1, got {text!r}")
    return prompt_len, gen_len, samples


def measure_cell(model: Any, tokens: Any, prompt_len: int, gen_len: int, samples: int) -> dict[str, Any]:
    """One generate call; returns the prefill and per-step decode times (wall and process CPU seconds)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.wall: list[float] = []
            self.cpu: list[float] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.wall.append(time.perf_counter())
            self.cpu.append(time.process_time())
            return scores

    input_ids = tokens[:, :prompt_len].repeat(samples, 1)  # (samples, prompt_len)
    clock = Clock()
    with torch.no_grad():
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=gen_len, min_new_tokens=gen_len,
                             logits_processor=LogitsProcessorList([clock]),
                             pad_token_id=model.config.eos_token_id)
        end_wall, end_cpu = time.perf_counter(), time.process_time()
    assert out.shape == (samples, prompt_len + gen_len), out.shape  # internal: min_new_tokens forced the length
    step_wall = [b - a for a, b in zip(clock.wall, clock.wall[1:])]
    step_cpu = [b - a for a, b in zip(clock.cpu, clock.cpu[1:])]
    return {"prompt_len": prompt_len, "gen_len": gen_len, "samples": samples,
            "prefill_wall_s": clock.wall[0] - start_wall, "prefill_cpu_s": clock.cpu[0] - start_cpu,
            "decode_step_wall_s": step_wall, "decode_step_cpu_s": step_cpu,
            "tail_wall_s": end_wall - clock.wall[-1], "tail_cpu_s": end_cpu - clock.cpu[-1]}


def weight_floor(model: Any, repeats: int = 5) -> float:
    """Best-of-``repeats`` seconds of one 1-token ``F.linear`` through every 2-D weight of the model (the embedding
    as the output head): the weight reads of one decode step with the model's own matrices and nothing else."""
    import torch
    import torch.nn.functional as F

    mats = [p for p in model.parameters() if p.dim() == 2]
    inputs = [torch.randn(1, m.shape[1]) for m in mats]
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for m, x in zip(mats, inputs):
                F.linear(x, m)
            times.append(time.perf_counter() - start)
    return min(times[1:])


def predict(sizes: Any, device: Any, head_parameters: int, prompt_len: int, gen_len: int, samples: int) -> dict:
    """The cost model's prefill time and mean decode time per token (both weight settings) for one cell."""
    from attnlab.cost import attention_cost, prefill_cost

    prefill = prefill_cost(sizes, prompt_len=prompt_len, samples=samples, kv_bytes=BYTES, weight_bytes=BYTES,
                           head_parameters=head_parameters)
    steps = gen_len - 1  # decode forwards; the first token comes from the prompt pass
    decode = {name: attention_cost(sizes, prompt_len=prompt_len + 1, gen_len=steps, samples=samples,
                                   kv_bytes=BYTES, weight_bytes=weight, batched=True)
              for name, weight in (("kinetics", 0.0), ("weights", BYTES))}
    weights = decode["weights"]
    weights_s = BYTES * sizes.num_parameters / device.bandwidth
    return {"prefill_pred_s": prefill.seconds(device),
            "decode_pred_kinetics_s": decode["kinetics"].seconds(device) / steps,
            "decode_pred_weights_s": weights.seconds(device) / steps,
            "decode_weight_read_s": weights_s,
            "decode_flops_s": weights.flops / device.peak_flops / steps}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = a + b·x``; returns (a, b)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    """Per-cell rows (measured, predicted, errors) and the decode-step line fit with its KV share."""
    rows = []
    for cell in data["cells"]:
        pred = cell["prediction"]
        decode_wall = statistics.median(cell["decode_step_wall_s"])
        decode_cpu = statistics.median(cell["decode_step_cpu_s"])
        rows.append({"prompt_len": cell["prompt_len"], "gen_len": cell["gen_len"], "samples": cell["samples"],
                     "rerun": cell.get("rerun", False),
                     "prefill_s": cell["prefill_wall_s"], "prefill_cpu_s": cell["prefill_cpu_s"],
                     "prefill_pred_s": pred["prefill_pred_s"],
                     "prefill_error": pred["prefill_pred_s"] / cell["prefill_wall_s"] - 1,
                     "peak_gflops": cell["accelerator"]["peak_flops"] / 1e9,
                     "bandwidth_gbs": cell["accelerator"]["bandwidth"] / 1e9,
                     "weight_floor_s": cell["weight_floor_s"], "weight_read_pred_s": pred["decode_weight_read_s"],
                     "decode_s": decode_wall, "decode_cpu_s": decode_cpu,
                     "decode_mean_s": statistics.fmean(cell["decode_step_wall_s"]),
                     "decode_pred_kinetics_s": pred["decode_pred_kinetics_s"],
                     "decode_pred_weights_s": pred["decode_pred_weights_s"],
                     "error_kinetics": pred["decode_pred_kinetics_s"] / decode_wall - 1,
                     "error_weights": pred["decode_pred_weights_s"] / decode_wall - 1})
    points = []  # (mean context, median step) per run of 64 decode steps: robust to a busy neighbour's spikes
    for cell in data["cells"]:
        steps = cell["decode_step_wall_s"]
        for first in range(0, len(steps) - 31, 64) if cell["samples"] == 1 else ():
            chunk = steps[first:first + 64]
            points.append((cell["prompt_len"] + first + 1 + (len(chunk) - 1) / 2, statistics.median(chunk)))
    fit: dict[str, Any] = {}
    if len({x for x, _ in points}) > 1:
        fixed, per_key = fit_line(points)
        model = (data["kv_bytes_per_key"] / statistics.median(c["accelerator"]["bandwidth"] for c in data["cells"])
                 + data["flops_per_key"] / statistics.median(c["accelerator"]["peak_flops"] for c in data["cells"]))
        fit = {"fixed_s": fixed, "per_key_s": per_key, "model_per_key_s": model, "slope_ratio": per_key / model,
               "kv_share": {str(c): per_key * c / (fixed + per_key * c) for c in (128, 1024, 4096, 8192, 16384)}}
    return {"rows": rows, "fit": fit}


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's data from several: the first run's header, each cell from the last run that has it (``rerun``)."""
    cells: dict[tuple[int, int, int], dict[str, Any]] = {}
    for index, run in enumerate(runs):
        for cell in run["cells"]:
            cells[(cell["prompt_len"], cell["gen_len"], cell["samples"])] = {**cell, "rerun": index > 0}
    loads = [f"{tuple(round(x, 2) for x in run['loadavg_before'])} → "
             f"{tuple(round(x, 2) for x in run['loadavg_after'])}" for run in runs]
    return {**runs[0], "cells": list(cells.values()), "loads": loads}


def render(data: dict[str, Any], markdown: bool) -> str:
    summary = summarise(data)
    acc = data["accelerator"]
    loads = data.get("loads") or [f"{data['loadavg_before']} → {data['loadavg_after']}"]
    lines = [f"at the start: {acc['note']}", "load (1, 5, 15 min) before → after: " + "; ".join(loads)]
    head = ["prompt", "gen", "N", "GFLOP/s", "GB/s", "prefill s", "pred s", "err", "decode s/token", "cpu s/token",
            "pred kinetics", "err", "pred +weights", "err", "weight floor s"]
    body = [[str(r["prompt_len"]) + ("*" if r["rerun"] else ""), str(r["gen_len"]), str(r["samples"]),
             f"{r['peak_gflops']:.0f}",
             f"{r['bandwidth_gbs']:.1f}", f"{r['prefill_s']:.3f}",
             f"{r['prefill_pred_s']:.3f}", f"{r['prefill_error']:+.0%}", f"{r['decode_s']:.4f}",
             f"{r['decode_cpu_s']:.4f}", f"{r['decode_pred_kinetics_s']:.5f}", f"{r['error_kinetics']:+.0%}",
             f"{r['decode_pred_weights_s']:.4f}", f"{r['error_weights']:+.0%}", f"{r['weight_floor_s']:.4f}"]
            for r in summary["rows"]]
    if markdown:
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
        lines += ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in body]
    fit = summary["fit"]
    if fit:
        shares = ", ".join(f"{c}: {s:.0%}" for c, s in fit["kv_share"].items())
        lines += ["", f"decode step (batch 1) = {fit['fixed_s'] * 1e3:.2f} ms + {fit['per_key_s'] * 1e6:.3f} us × "
                      f"context; the model's KV slope {fit['model_per_key_s'] * 1e6:.3f} us/key (measured "
                      f"{fit['slope_ratio']:.2f}× it); share of the step that grows with context: {shares}"]
    return "\n".join(lines)


def family_table(family: str, *, prompt_len: int, gen_lens: tuple[int, ...], top_ks: tuple[int, ...],
                 accelerator: str = "b200") -> str:
    """The cost model over a model family (no timing): per size and generation length, eFLOPs per generated token
    (dense and block top-k), the KV share of dense eFLOPs, cost relative to the family's smallest model, and the
    tokens each size can generate for the eFLOPs the smallest spends on the longest generation (dense)."""
    from attnlab.cost import ACCELERATORS, MODEL_FAMILIES, attention_cost

    device, sizes = ACCELERATORS[accelerator], MODEL_FAMILIES[family]
    smallest = next(iter(sizes.values()))

    def per_token(s: Any, gen_len: int, attention: str = "dense", top_k: int = 256) -> float:
        return attention_cost(s, prompt_len=prompt_len, gen_len=gen_len, attention=attention,  # type: ignore[arg-type]
                              top_k=top_k).efflops(device) / gen_len

    head = ["size", "params", "L_out", "dense eFLOP/token", "KV share", "× smallest"]
    head += [h for k in top_ks for h in (f"top-k {k} eFLOP/token", "× smallest")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for gen_len in gen_lens:
        for name, s in sizes.items():
            dense = attention_cost(s, prompt_len=prompt_len, gen_len=gen_len)
            cells = [name, f"{s.num_parameters / 1e9:.2f} B", str(gen_len), f"{dense.efflops(device) / gen_len:.3g}",
                     f"{device.intensity * dense.bytes / dense.efflops(device):.2f}",
                     f"{per_token(s, gen_len) / per_token(smallest, gen_len):.2f}"]
            for k in top_ks:
                sparse = per_token(s, gen_len, "topk", k)
                cells += [f"{sparse:.3g}", f"{sparse / per_token(smallest, gen_len, 'topk', k):.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
    longest = max(gen_lens)
    budget = per_token(smallest, longest) * longest
    lines += ["", f"Tokens each size can generate for the eFLOPs {next(iter(sizes))} spends on {longest} dense tokens "
              f"({budget:.3g} eFLOPs, prompt {prompt_len}, {accelerator}):", "",
              "| size | dense | " + " | ".join(f"top-k {k}" for k in top_ks) + " |",
              "|---|---|" + "---|" * len(top_ks)]
    for name, s in sizes.items():
        counts = []
        for attention, k in [("dense", 256), *(("topk", k) for k in top_ks)]:
            low, high = 1, 1 << 22  # largest gen_len whose total eFLOPs fit the budget (bisection)
            while low < high:
                mid = (low + high + 1) // 2
                fits = per_token(s, mid, attention, k) * mid <= budget
                low, high = (mid, high) if fits else (low, mid - 1)
            counts.append(str(low))
        lines.append(f"| {name} | " + " | ".join(counts) + " |")
    return "\n".join(lines)


def profile_decode(model_name: str, context: int, steps: int = 5) -> str:
    """The torch profiler's operator table (self CPU time) of ``steps`` decode steps after a ``context``-token
    prompt, batch 1: where the part of a step that grows with context goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import attnlab

    model, tokenizer = attnlab.load_model(model_name, dtype="float32", device="cpu")
    model.eval()
    model.set_attn_implementation("sdpa")
    ids = next(iter(attnlab.load_text(tokenizer, None, seq_len=context, max_windows=1)))["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for warm in (False, True):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps if warm else 2):
                    out = model(input_ids=token, past_key_values=past, use_cache=True)
                    token = out.logits[:, -1:].argmax(-1)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=list(DEFAULT_CELLS), help="PROMPT:GEN:SAMPLES cells")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", type=Path, default=REPO / "bench-results" / "cost_validation.json")
    parser.add_argument("--render", type=Path, nargs="+",
                        help="reprint saved JSONs instead of running (a later file's cell replaces the same cell "
                             "of an earlier one: a rerun; marked *)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--family", choices=("qwen3", "smollm2"),
                        help="print the cost model over this model family instead (no timing; markdown)")
    parser.add_argument("--profile-decode", type=int, metavar="CONTEXT",
                        help="print the profiler table of 5 decode steps after a CONTEXT-token prompt instead")
    args = parser.parse_args(argv)
    if args.profile_decode:
        print(profile_decode(args.model, args.profile_decode))
        return 0
    if args.family:
        print(family_table(args.family, prompt_len=1024, gen_lens=(1024, 8192, 32768), top_ks=(256, 32)))
        return 0
    if args.render:
        runs = []
        for path in args.render:
            try:
                runs.append(json.loads(path.read_text(encoding="utf-8")))
            except FileNotFoundError:
                print(f"error: --render {path} does not exist (bench-results/ is not in git: run the benchmark "
                      "first, or pass a JSON it wrote)", file=sys.stderr)
                return 2
            except (OSError, UnicodeDecodeError, ValueError) as error:
                print(f"error: --render {path}: {' '.join(str(error).split())}", file=sys.stderr)
                return 2
        try:
            table = render(merge(runs), args.markdown)
        except (KeyError, TypeError, IndexError) as error:
            print(f"error: --render: not a JSON written by cost_validation.py ({type(error).__name__}: {error})",
                  file=sys.stderr)
            return 2
        print(table)
        return 0
    cells = [parse_cell(text) for text in args.cells]

    import torch

    import attnlab
    from attnlab.cost import ModelSizes, measure_accelerator

    loadavg_before = os.getloadavg()
    device = measure_accelerator()
    print(device.note, file=sys.stderr, flush=True)
    model, tokenizer = attnlab.load_model(args.model, dtype="float32", device="cpu")
    model.eval()
    model.set_attn_implementation("sdpa")
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = ModelSizes(sum(p.numel() for p in model.parameters()), config.num_hidden_layers,
                       config.num_attention_heads, config.num_key_value_heads, head_dim)
    head_parameters = config.vocab_size * config.hidden_size
    longest = max(c[0] for c in cells)
    tokens = next(iter(attnlab.load_text(tokenizer, None, seq_len=longest, max_windows=1)))["input_ids"]
    measure_cell(model, tokens, min(32, longest), 8, 1)  # warm-up
    data: dict[str, Any] = {
        "machine": {**shared_machine_header(), "benchmark": "cost_validation"},
        "settings": {"model": args.model, "dtype": "float32", "attn_implementation": "sdpa", "cells": args.cells,
                     "torch_threads": torch.get_num_threads()},
        "accelerator": {"name": device.name, "peak_flops": device.peak_flops, "bandwidth": device.bandwidth,
                        "note": device.note},
        "sizes": dataclasses.asdict(sizes),
        "head_parameters": head_parameters,
        "kv_bytes_per_key": BYTES * 2 * sizes.num_kv_heads * sizes.folded_dim,
        "flops_per_key": 4 * sizes.num_heads * sizes.folded_dim,
        "loadavg_before": loadavg_before, "cells": [],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for prompt_len, gen_len, samples in cells:
        here = measure_accelerator()  # just before the cell: the machine is shared, its bandwidth drifts
        cell = {"accelerator": {"peak_flops": here.peak_flops, "bandwidth": here.bandwidth, "note": here.note},
                "weight_floor_s": weight_floor(model),
                **measure_cell(model, tokens, prompt_len, gen_len, samples)}
        cell["prediction"] = predict(sizes, here, head_parameters, prompt_len, gen_len, samples)
        data["cells"].append(cell)
        data["loadavg_after"] = os.getloadavg()
        args.json.write_text(json.dumps(data, indent=1))
        print(f"  {prompt_len}:{gen_len}:{samples} prefill {cell['prefill_wall_s']:.2f} s, decode "
              f"{statistics.median(cell['decode_step_wall_s']) * 1e3:.1f} ms/token (median), load "
              f"{os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    print(render(data, args.markdown))
    print(f"json: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
