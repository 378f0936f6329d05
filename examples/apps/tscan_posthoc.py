"""Post-hoc numbers of the tscan findings run (docs/apps/tscan.md, docs/findings.md), from its saved checkpoints.

    OMP_NUM_THREADS=1 attnlab app compare tscan --out runs/tscan
    python examples/apps/tscan_posthoc.py runs/tscan

Per (site, head) of each variant, over the run's eval batches (seed, batch size and count read from
RUN/results.json) and observed queries only: the attention mass on relevant, time-distractor and item-distractor
cells (the app's `relevant_mass` etc., not averaged over heads) and the attention entropy in nats. Then each
variant's accuracy with its binomial standard error √(p(1 − p)/n).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from attnlab.lab.apps.host import recording_probs
from _run import eval_batches, load_variant, run_settings  # examples/apps/_run.py, beside this script

VARIANTS = ("tscan", "plain")


def per_head(run: Path, variant: str, settings: dict) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Masses (S, H, 3) and entropies (S, H), means over every observed query; accuracy and example count."""
    app, model, data = load_variant(run / variant / "checkpoint", settings)
    mass = entropy = 0.0
    queries = correct = examples = 0
    with recording_probs(site.layer for site in model.attention_sites) as layers:
        for batch in eval_batches(data, settings):
            logits = model(**batch)
            probs = torch.stack([layer.last_probs for layer in layers], dim=1).double()  # (B, S, H, N, N)
            B = probs.shape[0]
            observed = batch["observed"].reshape(B, 1, 1, -1).double()  # query weights (B, 1, 1, N)
            kinds = F.one_hot(batch["kind"].reshape(B, -1), 3).double()  # (B, N, 3): relevant, time, item
            mass = mass + ((probs @ kinds[:, None, None]) * observed[..., None]).sum(dim=(0, 3))
            row_entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # (B, S, H, N)
            entropy = entropy + (row_entropy * observed).sum(dim=(0, 3))
            queries += int(batch["observed"].sum())
            correct += int(((logits > 0).float() == batch["label"]).sum())
            examples += B
    return mass / queries, entropy / queries, correct / examples, examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="?", default="runs/tscan", help="the folder of `attnlab app compare tscan`")
    run = Path(parser.parse_args().run)
    settings = run_settings(run)
    torch.set_grad_enabled(False)
    results = {variant: per_head(run, variant, settings) for variant in VARIANTS}
    print("mass on relevant / time-distractor / item-distractor cells, entropy (nats); observed queries of "
          f"{settings['eval_batches']} eval batches")
    print(f"{'site, head':10}  " + "  ".join(f"{variant:29}" for variant in VARIANTS))
    sites, heads = results[VARIANTS[0]][1].shape
    for s in range(sites):
        for h in range(heads):
            cells = [f"{m[s, h, 0]:.3f} / {m[s, h, 1]:.3f} / {m[s, h, 2]:.3f}, {e[s, h]:.2f}"
                     for m, e, _, _ in results.values()]
            print(f"{s}, {h:<7}  " + "  ".join(f"{cell:29}" for cell in cells))
    for variant, (_, _, accuracy, n) in results.items():
        se = (accuracy * (1 - accuracy) / n) ** 0.5
        print(f"{variant}: accuracy {accuracy:.4f} ± {se:.4f} (binomial s.e., {n} examples; "
              f"{round(accuracy * n)} correct)")


if __name__ == "__main__":
    main()
