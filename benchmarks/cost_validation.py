"""Predicted vs measured time of SmolLM2-135M greedy generation on this CPU: the Kinetics cost model validated.

What runs: transformers ``generate`` (greedy, the KV cache, ``attn_implementation="sdpa"``, float32, CPU, batch =
samples, the same prompt copied per sample) on real text (the bundled Shakespeare), for each (prompt_len, gen_len,
samples) cell (``--cells``; default prompts 128/1024/4096 × gen 64/256 and 2048/8192 × gen 64 at batch 1, plus
1024/64 at batch 4). A logits processor stamps wall (``perf_counter``) and process CPU (``process_time``) time each
time a token is chosen: ``prefill`` is the time to the first token (the prompt pass), each later gap is one decode
step (one forward of one new token per sample, plus generate's own bookkeeping). ``min_new_tokens =
max_new_tokens`` forces ``gen_len`` tokens.

What it predicts (``attnlab.cost``, kv_bytes = weight_bytes = 4 for float32), with this machine's peak FLOP/s and
read bandwidth measured at the start of the same run (``measure_accelerator``):

- ``prefill``: :func:`attnlab.cost.prefill_cost` (the output head on the last position only);
- decode per token, ``kinetics``: :func:`attnlab.cost.attention_cost` with ``weight_bytes = 0`` (the paper's
  setting: weight loads amortised by batching), divided by the decode steps;
- decode per token, ``weights``: the same with ``weight_bytes = 4`` and ``batched=True`` (every float32 weight read
  once per decode step, shared by the batch's samples).

``error = predicted / measured − 1`` per cell (wall time). A least-squares line through every batch-1 decode step,
``t(context) = fixed + per_key·context``, splits the measured step into a context-independent part (weights,
per-op overhead) and the part that grows with the KV cache (attention, cache append); it is set against the model's
KV slope ``kv_bytes·2·n_kv·d / bandwidth + 4·n_q·d / peak``.

One process (the model loads once); ``os.getloadavg()`` before and after (the machine is shared).

    python benchmarks/cost_validation.py                                   # the docs run (~4 min on 2 cores)
    python benchmarks/cost_validation.py --cells 128:16:1 256:16:1         # smoke test (~30 s)
    python benchmarks/cost_validation.py --render bench-results/cost_validation.json --markdown

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
        decode_wall = statistics.fmean(cell["decode_step_wall_s"])
        decode_cpu = statistics.fmean(cell["decode_step_cpu_s"])
        rows.append({"prompt_len": cell["prompt_len"], "gen_len": cell["gen_len"], "samples": cell["samples"],
                     "prefill_s": cell["prefill_wall_s"], "prefill_cpu_s": cell["prefill_cpu_s"],
                     "prefill_pred_s": pred["prefill_pred_s"],
                     "prefill_error": pred["prefill_pred_s"] / cell["prefill_wall_s"] - 1,
                     "decode_s": decode_wall, "decode_cpu_s": decode_cpu,
                     "decode_pred_kinetics_s": pred["decode_pred_kinetics_s"],
                     "decode_pred_weights_s": pred["decode_pred_weights_s"],
                     "error_kinetics": pred["decode_pred_kinetics_s"] / decode_wall - 1,
                     "error_weights": pred["decode_pred_weights_s"] / decode_wall - 1})
    points = [(cell["prompt_len"] + step + 1, seconds) for cell in data["cells"] if cell["samples"] == 1
              for step, seconds in enumerate(cell["decode_step_wall_s"])]
    fit: dict[str, Any] = {}
    if len({x for x, _ in points}) > 1:
        fixed, per_key = fit_line(points)
        model = data["model_kv_slope_s_per_key"]
        fit = {"fixed_s": fixed, "per_key_s": per_key, "model_per_key_s": model, "slope_ratio": per_key / model,
               "kv_share": {str(c): per_key * c / (fixed + per_key * c) for c in (128, 1024, 4096, 8192, 16384)}}
    return {"rows": rows, "fit": fit}


def render(data: dict[str, Any], markdown: bool) -> str:
    summary = summarise(data)
    acc = data["accelerator"]
    lines = [acc["note"], f"load before {data['loadavg_before']} after {data['loadavg_after']}"]
    head = ["prompt", "gen", "N", "prefill s", "pred s", "err", "decode s/token", "cpu s/token", "pred kinetics",
            "err", "pred +weights", "err"]
    body = [[str(r["prompt_len"]), str(r["gen_len"]), str(r["samples"]), f"{r['prefill_s']:.3f}",
             f"{r['prefill_pred_s']:.3f}", f"{r['prefill_error']:+.0%}", f"{r['decode_s']:.4f}",
             f"{r['decode_cpu_s']:.4f}", f"{r['decode_pred_kinetics_s']:.5f}", f"{r['error_kinetics']:+.0%}",
             f"{r['decode_pred_weights_s']:.4f}", f"{r['error_weights']:+.0%}"] for r in summary["rows"]]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=list(DEFAULT_CELLS), help="PROMPT:GEN:SAMPLES cells")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", type=Path, default=REPO / "bench-results" / "cost_validation.json")
    parser.add_argument("--render", type=Path, help="reprint a saved JSON instead of running")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text()), args.markdown))
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
    kv_slope = (BYTES * 2 * sizes.num_kv_heads * sizes.folded_dim / device.bandwidth
                + 4 * sizes.num_heads * sizes.folded_dim / device.peak_flops)
    data: dict[str, Any] = {
        "machine": {**shared_machine_header(), "benchmark": "cost_validation"},
        "settings": {"model": args.model, "dtype": "float32", "attn_implementation": "sdpa", "cells": args.cells,
                     "torch_threads": torch.get_num_threads()},
        "accelerator": {"name": device.name, "peak_flops": device.peak_flops, "bandwidth": device.bandwidth,
                        "note": device.note},
        "sizes": dataclasses.asdict(sizes),
        "head_parameters": head_parameters, "model_kv_slope_s_per_key": kv_slope,
        "loadavg_before": loadavg_before, "cells": [],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for prompt_len, gen_len, samples in cells:
        cell = measure_cell(model, tokens, prompt_len, gen_len, samples)
        cell["prediction"] = predict(sizes, device, head_parameters, prompt_len, gen_len, samples)
        data["cells"].append(cell)
        data["loadavg_after"] = os.getloadavg()
        args.json.write_text(json.dumps(data, indent=1))
        print(f"  {prompt_len}:{gen_len}:{samples} prefill {cell['prefill_wall_s']:.2f} s, decode "
              f"{statistics.fmean(cell['decode_step_wall_s']) * 1e3:.1f} ms/token", file=sys.stderr, flush=True)
    print(render(data, args.markdown))
    print(f"json: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
