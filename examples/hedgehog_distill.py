"""Distill Hedgehog feature maps from one attention layer of the bundled SmolLM2 on Shakespeare text.

Captures the layer's rotary-applied query/key/value on two 256-token windows (``attnlab.capture.qkv``), trains one
``HedgehogFeatureMap`` per query head and per kv head with the attention-distillation loss (METHODS.md #25), and
reports the fidelity reached on that window and on a held-out window: mean KL(softmax ‖ hedgehog) per query row,
and the relative output error ‖ŷ − y‖/‖y‖ of the attention outputs (before the output projection).

    .venv/bin/python examples/hedgehog_distill.py                    # layer 14, 100 steps, ~1 min on 2 idle cores
    .venv/bin/python examples/hedgehog_distill.py --layer 3 --steps 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import attnlab
from attnlab.capture.qkv import capture_qkv
from attnlab.layers.hedgehog import HedgehogFeatureMap, distill_feature_maps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", type=int, default=14)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--train-windows", type=int, default=2, help="windows trained on together (one batch)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer = attnlab.load_model("smollm2-135m")
    windows = list(attnlab.load_text(tokenizer, seq_len=args.seq_len, max_windows=args.train_windows + 1))
    train, held_out = torch.cat([w["input_ids"] for w in windows[:-1]]), windows[-1]
    q, k, v = capture_qkv(model, train, args.layer)
    eval_inputs = capture_qkv(model, held_out["input_ids"], args.layer)
    start = time.perf_counter()
    result = distill_feature_maps(HedgehogFeatureMap(q.shape[1], q.shape[-1]), HedgehogFeatureMap(k.shape[1],
                                  k.shape[-1]), q, k, v, steps=args.steps, lr=args.lr, eval_inputs=eval_inputs)
    summary = {"layer": args.layer, "steps": args.steps, "lr": args.lr, "seq_len": args.seq_len,
               "train_windows": args.train_windows,
               "train_seconds": round(time.perf_counter() - start, 1),
               **{key: round(value, 4) for key, value in vars(result).items() if key != "losses"},
               "loss_first": round(result.losses[0], 4) if result.losses else None,
               "loss_last": round(result.losses[-1], 4) if result.losses else None}
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
