"""Reproduction 2 (issue 11): extreme-token phenomena on Bigram-Backcopy (Guo et al. 2024, METHODS.md #3).

Trains the runs fixed in examples/lab/PLAN.md (item 2) with ``attnlab train`` (skipped when a run's checkpoint
exists), then measures each checkpoint on 8 eval sequences with a probe written for this script:

- **active / dormant**: mean attention on BOS (key 0) from trigger queries vs non-trigger queries, per layer. The
  paper's head is *dormant* on non-triggers (nearly all mass on BOS) and *active* on triggers (mass on the token
  to copy);
- **value drain**: ‖v_BOS‖ / median ‖v_j‖ over the other keys, per layer;
- **residual peak**: ‖h_BOS‖ / median ‖h_j‖ of the residual stream after each block;
- backcopy accuracy (next-token accuracy at the copy positions) and eval loss.

    python examples/lab/active_dormant.py --out runs/bbm     # trains 4 runs (~15 min on 2 cores), then measures

Writes ``OUT/active_dormant.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

import attnlab
from attnlab.functional.attention import BlockView
from attnlab.lab.tasks import TASKS
from attnlab.probes.base import AttentionCall, Probe, SequenceInfo

RUNS = {  # name: the run's own `attnlab train` arguments, learning rate included (shared ones in COMMON)
    "softmax-1L": ["--layer", "masked", "--layers", "1", "--lr", "1e-3"],
    "softmax-3L": ["--layer", "masked", "--layers", "3", "--lr", "1e-3"],
    "relu-3L": ["--layer", "relu", "--layers", "3", "--lr", "1e-3"],
    "softmax-3L-sgd": ["--layer", "masked", "--layers", "3", "--optimizer", "sgd", "--lr", "0.1"],
}
COMMON = ["--task", "bigram_backcopy", "--width", "256", "--heads", "1", "--positions", "learned",
          "--steps", "600", "--batch-size", "32", "--eval-every", "250", "--seed", "0"]


class ExtremeTokens(Probe):
    """BOS attention by query class, BOS value-norm ratio and BOS residual-norm ratio, per layer (see module)."""

    name = "extreme_tokens"
    needs = frozenset({"probs", "value", "hidden_states"})

    def __init__(self, is_trigger: torch.Tensor) -> None:
        self.is_trigger = is_trigger  # (V,) bool
        self.bos = {}  # (layer, "trigger"|"other") -> [sum, count]
        self.value_ratio: dict[int, list[float]] = {}
        self.residual_ratio: dict[int, list[float]] = {}

    def begin_call(self, call: AttentionCall) -> None:
        norms = call.value.float().norm(dim=-1).mean(1)  # (B, Lk), mean over kv heads
        ratio = norms[:, 0] / norms[:, 1:].median(dim=-1).values
        self.value_ratio.setdefault(call.layer_idx, []).extend(ratio.tolist())

    def update(self, call: AttentionCall, block: BlockView) -> None:
        ids = call.sequence.input_ids[:, -call.q_len:][:, block.q_index]  # (B, bq)
        trigger = self.is_trigger[ids]
        on_bos = block.probs[..., 0].mean(1)  # (B, bq), mean over heads
        for label, rows in (("trigger", trigger), ("other", ~trigger)):
            total = self.bos.setdefault((call.layer_idx, label), [0.0, 0])
            total[0] += float(on_bos[rows].sum())
            total[1] += int(rows.sum())

    def on_hidden_states(self, layer_idx: int, hidden_states: torch.Tensor, sequence: SequenceInfo) -> None:
        norms = hidden_states.float().norm(dim=-1)  # (B, T)
        ratio = norms[:, 0] / norms[:, 1:].median(dim=-1).values
        self.residual_ratio.setdefault(layer_idx, []).extend(ratio.tolist())

    def summary(self) -> dict[int, dict[str, float]]:
        layers = sorted(self.value_ratio)
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {layer: {"bos_attention_trigger": self.bos[(layer, "trigger")][0] / self.bos[(layer, "trigger")][1],
                        "bos_attention_other": self.bos[(layer, "other")][0] / self.bos[(layer, "other")][1],
                        "bos_value_norm_ratio": mean(self.value_ratio[layer]),
                        "bos_residual_norm_ratio": mean(self.residual_ratio.get(layer, [float("nan")]))}
                for layer in layers}


def measure(checkpoint: Path, batches: int = 1, batch_size: int = 8) -> dict:
    model, _ = attnlab.load_model(checkpoint)
    task = TASKS.get("bigram_backcopy")(seq_len=256, seed=0)
    probe = ExtremeTokens(torch.from_numpy(task.is_trigger))
    correct = counted = 0
    losses = []
    with torch.no_grad(), attnlab.Session(model, probes=[probe]):
        for step in range(batches):
            batch = task.batch(step, batch_size, split="eval")
            out = model(input_ids=batch["input_ids"], targets=batch["labels"])
            losses.append(float(out.loss))
            c, n = task.accuracy(out.logits, batch["labels"])
            correct, counted = correct + c, counted + n
    return {"layers": probe.summary(), "eval_loss": sum(losses) / len(losses),
            "backcopy_accuracy": correct / max(counted, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bbm"))
    parser.add_argument("--only-measure", action="store_true")
    args = parser.parse_args()
    results = {}
    for name, extra in RUNS.items():
        run_dir = args.out / name
        if not (run_dir / "checkpoint").exists() and not args.only_measure:
            command = [sys.executable, "-m", "attnlab", "train", *COMMON, *extra, "--out", str(run_dir)]
            print(" ".join(command[1:]), flush=True)
            subprocess.run(command, check=True)
        results[name] = {"arguments": [*COMMON, *extra], **measure(run_dir / "checkpoint")}
    (args.out / "active_dormant.json").write_text(json.dumps(results, indent=2))
    print("| run | layer | BOS attn (trigger q) | BOS attn (other q) | ‖v_BOS‖/median | ‖h_BOS‖/median | backcopy acc |")
    print("|---|---|---|---|---|---|---|")
    for name, result in results.items():
        for layer, stats in result["layers"].items():
            print(f"| {name} | {layer} | {stats['bos_attention_trigger']:.3f} | {stats['bos_attention_other']:.3f} "
                  f"| {stats['bos_value_norm_ratio']:.2f} | {stats['bos_residual_norm_ratio']:.2f} "
                  f"| {result['backcopy_accuracy']:.3f} |")


if __name__ == "__main__":
    main()
