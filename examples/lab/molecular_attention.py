"""Reproduction 5 (issue 11): does attention fall as 1/distance in a Transformer trained on atom coordinates?

Kreiman et al. 2025 (METHODS.md #9). A bidirectional TinyLM backbone (softmax attention, no positions) reads an MLP
embedding of each atom's centred Cartesian coordinates and predicts the Lennard-Jones energy of random clusters
(:mod:`attnlab.lab.molecules`) as a sum of per-atom terms. After training, the ``coordinate_decay`` probe bins
post-softmax attention by interatomic distance and fits a ∝ r^-p. The same probe on the untrained model is the
control. Settings are fixed in examples/lab/PLAN.md (item 5).

    python examples/lab/molecular_attention.py --out runs/molecular      # ~5 min on a 2-core CPU

Writes ``OUT/molecular.json`` (settings, MAE, exponents per layer, curves) and ``OUT/attention_vs_distance.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from attnlab import Session
from attnlab.lab.modeling import TinyLMSpec, build_model
from attnlab.lab.molecules import LennardJonesClusters
from attnlab.probes.coordinate_decay import CoordinateDecayProbe


class EnergyModel(nn.Module):
    """Coordinates (B, N, 3) → energy (B,): MLP embedding, TinyLM backbone (bidirectional), per-atom readout sum."""

    def __init__(self, width: int, num_layers: int, num_heads: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Sequential(nn.Linear(3, width), nn.GELU(), nn.Linear(width, width))
        spec = TinyLMSpec(layer="masked", vocab_size=2, num_layers=num_layers, hidden_size=width,
                          num_heads=num_heads, positions="none", causal=False, max_position_embeddings=512)
        self.backbone = build_model(spec, seed=seed).model
        self.readout = nn.Linear(width, 1)
        nn.init.zeros_(self.readout.weight)  # start from the mean energy (targets are standardised)

    def forward(self, coordinates: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(inputs_embeds=self.embed(coordinates)).last_hidden_state
        return self.readout(hidden).squeeze(-1).sum(-1)


def measure(model: EnergyModel, data: LennardJonesClusters, batches: int, batch_size: int,
            bin_width: float) -> CoordinateDecayProbe:
    probe = CoordinateDecayProbe(bin_width=bin_width, max_distance=2 * data.radius + bin_width)
    model.eval()
    with torch.no_grad(), Session(model.backbone, probes=[probe]) as session:
        for step in range(batches):
            x = data.batch(step, batch_size, split="eval")["coordinates"]
            probe.set_coordinates(x)
            model.backbone(inputs_embeds=model.embed(x))
    del session
    return probe


def summary(probe: CoordinateDecayProbe) -> dict:
    rows = probe.rows()
    layers = sorted({r["layer"] for r in rows})
    out = {}
    for layer in layers:
        pick = {r["statistic"]: r["value"] for r in rows if r["layer"] == layer and r["head"] is None
                and r["position"] is None}
        curve = {r["position"]: r["value"] for r in rows if r["statistic"] == "mean_attention" and r["layer"] == layer}
        heads = [r["value"] for r in rows if r["statistic"] == "power_law_exponent" and r["layer"] == layer]
        out[layer] = {"exponent": pick.get("layer_power_law_exponent"), "r2": pick.get("layer_power_law_r2"),
                      "head_exponents": heads, "curve": curve}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/molecular"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data = LennardJonesClusters(num_atoms=16, density=0.5, min_distance=0.9, seed=args.seed)
    reference = LennardJonesClusters(num_atoms=16, density=0.5, min_distance=0.9, seed=args.seed + 1000)
    energies = reference.batch(0, 1024)["energy"]
    mean, std = float(energies.mean()), float(energies.std())

    model = EnergyModel(args.width, args.layers, args.heads, args.seed)
    before = summary(measure(model, data, 8, 64, 0.25))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, args.steps - warmup))))))
    start, log = time.perf_counter(), []
    for step in range(args.steps):
        model.train()
        batch = data.batch(step, args.batch_size)
        target = (batch["energy"].float() - mean) / std
        loss = nn.functional.mse_loss(model(batch["coordinates"]), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps - 1:
            log.append({"step": step, "train_mse": loss.item()})
            print(f"step {step:5d}  train mse (standardised) {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - start

    model.eval()
    errors, baseline = [], []
    with torch.no_grad():
        for step in range(8):
            batch = data.batch(step, 64, split="eval")
            predicted = model(batch["coordinates"]).double() * std + mean
            errors.append((predicted - batch["energy"]).abs())
            baseline.append((batch["energy"] - mean).abs())
    after = summary(measure(model, data, 8, 64, 0.25))
    result = {
        "settings": {**vars(args), "out": str(args.out), "data": data.describe(), "energy_mean": mean,
                     "energy_std": std},
        "train_seconds": seconds, "log": log,
        "eval_mae": float(torch.cat(errors).mean()), "mean_predictor_mae": float(torch.cat(baseline).mean()),
        "trained": after, "untrained": before,
    }
    (args.out / "molecular.json").write_text(json.dumps(result, indent=2))
    plot(after, before, args.out / "attention_vs_distance.png")
    print(f"eval MAE {result['eval_mae']:.3f} ε (mean predictor {result['mean_predictor_mae']:.3f} ε), "
          f"{seconds:.0f} s of training")
    for layer, fit in after.items():
        print(f"layer {layer}: p = {fit['exponent']:.2f} (R² {fit['r2']:.2f}); untrained p = "
              f"{before[layer]['exponent']:.2f}")


def plot(after: dict, before: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for layer, fit in after.items():
        bins = sorted(fit["curve"])
        ax.plot([(b + 0.5) * 0.25 for b in bins], [fit["curve"][b] for b in bins], label=f"layer {layer}")
    bins = sorted(before[0]["curve"])
    ax.plot([(b + 0.5) * 0.25 for b in bins], [before[0]["curve"][b] for b in bins], "k--", label="untrained, layer 0")
    ax.set(xscale="log", yscale="log", xlabel="interatomic distance r (σ)", ylabel="mean attention a_ij",
           title="Attention vs distance, LJ clusters (16 atoms)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
