"""Cost of attnlab's edits during a forward pass, against the unedited model on transformers' SDPA.

Model: the bundled SmolLM2-135M, float32, CPU, batch 1, one window of real corpus tokens per length. In one
process, after one warm-up forward per configuration, each repeat runs every configuration once (order rotated per
repeat) and times the forward (wall and process CPU seconds); the median over repeats is reported, with its ratio
to ``sdpa`` of the same repeats. Configurations:

- ``sdpa``: ``attn_implementation="sdpa"``, no Session (the baseline);
- ``session``: inside ``Session(model)`` with no edit and no probe (the backend's own cost);
- one configuration per edit spec (``--edits``), inside ``Session(model, edits=[spec])`` with the default
  self-verification (16 sampled query rows per call), plus the same edit with ``verify_rows=0`` for the fast ones.

Fast edits (temperature, zerotuning, head_scale, identity_blend, first_key, sink_window) run in SDPA with no probs
materialised; window_decay and calibration run on the blocked eager kernel, and window_decay also with
``flex=True`` (compiled FlexAttention; compiling happens in the warm-up forward). The machine may be shared: the JSON
records the load average before and after.

    python benchmarks/edit_overhead.py                                # the run in docs/benchmarks.md, ~5 min
    python benchmarks/edit_overhead.py --lengths 256 --repeats 2      # smoke test
    python benchmarks/edit_overhead.py --render bench-results/edit_overhead.json --markdown

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
from probe_overhead import REPO, machine_header  # noqa: E402

EDITS = ["temperature:tau=0.8", "zerotuning:gamma=2", "head_scale:scale=0,heads=0", "identity_blend:alpha=0.3",
         "first_key:alpha=1,heads=1", "sink_window:sinks=4,window=252", "window_decay:window=512,alpha=0.9",
         "calibration:beta=0.4,theta=0.1"]


def measure(lengths: list[int], edits: list[str], repeats: int, model_name: str) -> list[dict[str, Any]]:
    import torch

    import attnlab
    from attnlab.edits import parse_edit_spec

    model, tokenizer = attnlab.load_model(model_name)
    rows: list[dict[str, Any]] = []
    for length in lengths:
        windows = attnlab.load_text(tokenizer, None, seq_len=length, max_windows=1)
        input_ids = next(iter(windows))["input_ids"][:1]
        configs: list[tuple[str, Any]] = [("sdpa", None), ("session", [])]
        for spec in edits:
            configs.append((spec, dict(edits=[spec])))
            if parse_edit_spec(spec).fast:
                configs.append((spec + " (verify_rows=0)", dict(edits=[spec], verify_rows=0)))
            elif parse_edit_spec(spec).stage == "logits":
                configs.append((spec + " (flex)", dict(edits=[spec], flex=True)))

        def run(options: Any) -> tuple[float, float]:
            model.set_attn_implementation("sdpa")
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            with torch.no_grad():
                if options is None:
                    model(input_ids=input_ids)
                else:
                    kwargs = options if isinstance(options, dict) else {}
                    with attnlab.Session(model, **kwargs):
                        model(input_ids=input_ids)
            return time.perf_counter() - start_wall, time.process_time() - start_cpu

        for _, options in configs:  # warm-up
            run(options)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in configs}
        for repeat in range(repeats):
            shift = repeat % len(configs)
            for name, options in configs[shift:] + configs[:shift]:
                times[name].append(run(options))
            print(f"length {length}: repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
        base = [wall for wall, _ in times["sdpa"]]
        for name, _ in configs:
            walls = [wall for wall, _ in times[name]]
            cpus = [cpu for _, cpu in times[name]]
            rows.append({"length": length, "config": name, "repeats": repeats,
                         "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
                         "ratio_vs_sdpa": statistics.median(w / b for w, b in zip(walls, base))})
    return rows


def render(payload: dict[str, Any], markdown: bool) -> str:
    head = ["length", "configuration", "wall s (median)", "CPU s", "× sdpa"]
    body = [[str(r["length"]), r["config"], f"{r['wall_s']:.3f}", f"{r['cpu_s']:.2f}", f"{r['ratio_vs_sdpa']:.2f}"]
            for r in payload["rows"]]
    if not markdown:
        return "\n".join("  ".join(cells) for cells in [head, *body])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--edits", nargs="+", default=EDITS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--json", type=Path, default=REPO / "bench-results" / "edit_overhead.json")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--render", type=Path, metavar="JSON")
    args = p.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text()), args.markdown))
        return 0
    header = {**machine_header(), "benchmark": "edit_overhead", "load_before": os.getloadavg()}
    rows = measure(args.lengths, args.edits, args.repeats, args.model)
    payload = {**header, "load_after": os.getloadavg(), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(args.json)
    print(render(payload, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
