"""Training throughput of a TinyLM per layer: tokens per second of forward + backward + AdamW step.

Model: TinyLM (2 layers, width 64, 4 heads, RoPE where the layer takes it, MLP ratio 4, vocab 256), float32, CPU.
Each sequence length gets the same number of tokens per step (``--tokens``, default 4096: batch = tokens / seq_len),
random token ids with next-token labels. In one process, after one warm-up step per (layer, length), each repeat runs
every layer once at that length (order rotated per repeat) and times one training step (wall seconds); the median
over repeats is reported, with its ratio to ``masked`` (softmax through SDPA) in the same repeats (> 1 = faster).
A layer that fails at a length (memory, an unsupported shape) is recorded with its error instead of a time.

    python benchmarks/train_throughput.py                                 # the run in docs/benchmarks.md
    python benchmarks/train_throughput.py --lengths 256 --repeats 2 --layers masked gla    # smoke test

Writes ``bench-results/train_throughput.json`` (``--out``) and prints a table. Not part of the attnlab package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_overhead import REPO, machine_header  # noqa: E402

BASELINE = "masked"


def build(layer: str, width: int, num_layers: int, seq_len: int) -> Any:
    import torch

    from attnlab.lab.modeling import TinyLMSpec, build_model

    spec = TinyLMSpec(layer=layer, vocab_size=256, num_layers=num_layers, hidden_size=width, num_heads=4,
                      max_position_embeddings=max(seq_len, 4096))
    model = build_model(spec, seed=0)
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def step_seconds(model: Any, optimizer: Any, input_ids: Any) -> float:
    start = time.perf_counter()
    loss = model(input_ids=input_ids[:, :-1], targets=input_ids[:, 1:]).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def measure(layers: list[str], lengths: list[int], tokens: int, repeats: int, width: int,
            num_layers: int) -> list[dict[str, Any]]:
    import torch

    rows: list[dict[str, Any]] = []
    for seq_len in lengths:
        batch = max(1, tokens // seq_len)
        input_ids = torch.randint(0, 256, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seq_len))
        built: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for layer in layers:
            try:
                built[layer] = build(layer, width, num_layers, seq_len)
                step_seconds(*built[layer], input_ids)  # warm-up
            except Exception as error:  # noqa: BLE001 - recorded in the results, the run goes on
                errors[layer] = _message(error)
                built.pop(layer, None)
        times: dict[str, list[float]] = {layer: [] for layer in built}
        order = list(built)
        for repeat in range(repeats):
            turn = repeat % len(order) if order else 0
            for layer in order[turn:] + order[:turn]:
                if layer in errors:
                    continue
                try:
                    times[layer].append(step_seconds(*built[layer], input_ids))
                except Exception as error:  # noqa: BLE001 - as in warm-up: recorded, the other layers go on
                    errors[layer] = _message(error)
                    built.pop(layer, None)
        base = statistics.median(times[BASELINE]) if BASELINE in times else None
        for layer in layers:
            row: dict[str, Any] = {"layer": layer, "seq_len": seq_len, "batch": batch}
            if layer in errors:
                row["error"] = errors[layer]
            else:
                median = statistics.median(times[layer])
                row.update(seconds=median, tokens_per_s=batch * seq_len / median,
                           speed_vs_masked=None if base is None else base / median)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _message(error: Exception) -> str:
    lines = str(error).splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:160]}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lengths = sorted({r["seq_len"] for r in rows})
    lines = ["| layer | " + " | ".join(f"{n} tok/s (× masked)" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for layer in dict.fromkeys(r["layer"] for r in rows):
        cells = []
        for n in lengths:
            row = next(r for r in rows if r["layer"] == layer and r["seq_len"] == n)
            speed = row.get("speed_vs_masked")
            cells.append(row["error"][:40] if "error" in row else
                         f"{row['tokens_per_s']:,.0f} ({'–' if speed is None else f'{speed:.2f}'}×)")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from attnlab.layers import LAYERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=None, help="layer names (default: every registered layer "
                        "that needs no extra arguments)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 1024, 4096])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "train_throughput.json")
    parser.add_argument("--render", type=Path, default=None, help="print the markdown table of a saved JSON")
    args = parser.parse_args()
    if args.render:
        print(markdown(json.loads(args.render.read_text())["rows"]))
        return
    layers = args.layers or [BASELINE, *[n for n in LAYERS.names() if n not in (BASELINE, "decay_matrix")]]
    rows = measure(layers, args.lengths, args.tokens, args.repeats, args.width, args.num_layers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine_header(), "settings": {k: str(v) for k, v in vars(args).items()},
                               "rows": rows}, indent=2))
    tmp.replace(args.out)
    print(markdown(rows))


if __name__ == "__main__":
    main()
