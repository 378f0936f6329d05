"""SoftPAG guidance and a small HeadHunter search on the DiT lab's trained image model (docs/diffusion_methods.md).

Search: HeadHunter over every self-attention head, objective = the lab classifier's one-object accuracy on images
sampled (CFG + SoftPAG) for scenes drawn with another seed than the lab's test scenes. Held out: the lab's standard
evaluation (its fixed test scenes) of plain CFG, SoftPAG on a whole layer (PAG's layer-level
perturbation) and SoftPAG on the heads HeadHunter chose, with and without CFG. Every setting below was fixed
before the first run.

    OMP_NUM_THREADS=1 python examples/dit_guidance.py [PIPELINE_DIR] [OUT_JSON] [quick|full]
"""

import json
import sys
import time
from pathlib import Path

import torch

from attnlab.diffusion import DiffusionSession
from attnlab.diffusion.guidance import perturbable_heads
from attnlab.diffusion.headhunter import headhunter
from attnlab.lab.dit.evaluate import evaluate_pipeline
from attnlab.lab.dit.pipeline import load_pipeline
from attnlab.lab.dit.softpag import lab_objective, lab_predictor

# settings (fixed before running) ----------------------------------------------------------------------------
# Two profiles, each fixed before its first run: "quick" (run first: 2 min on two shared cores) and "full" (fixed
# after the quick run, before running it: more search images, a third round, and held out the lab's own evaluation
# settings, 100 + 100 test scenes, 20 steps, noise seed 0, so its "cfg" row must reproduce `attnlab dit eval`).
PIPELINE = sys.argv[1] if len(sys.argv) > 1 else "runs/dit17/image"
OUT = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/dit17/guidance/dit_guidance.json")
PROFILE = sys.argv[3] if len(sys.argv) > 3 else "quick"
GUIDANCE = 3.0             # CFG scale s (the lab's default)
ALPHA = 1.0                # SoftPAG α of the search (1 = PAG's identity attention)
SCALE = 2.0                # perturbation guidance w
SOFT_ALPHA = 0.5           # a softer α for the chosen heads, held out only
SEARCH_SCENE_SEED = 17     # search scenes: eval_scenes(seed=17), not the lab's test seed
SEARCH_NOISE_SEED = 0
METRIC = "accuracy"        # the objective: one-object samples whose top class is the caption's colour and shape
SEARCH_STEPS, EVAL_STEPS, ROUNDS, SEARCH_SAMPLES, EVAL_SAMPLES, EVAL_NOISE_SEED = {
    # Euler steps of the search and of the held-out runs, HeadHunter rounds (16 candidates: 1 + 16 + 15 (+ 14)
    # objective calls), one-object search scenes (images per objective call), held-out eval_scenes("image", n)
    # (n one-object + n two-object), held-out noise seed
    "quick": (10, 10, 2, 16, 32, 1000),
    "full": (10, 20, 3, 48, 100, 0),
}[PROFILE]
PAG_BLOCK = 1              # the layer-level comparison: every head of block 1's self-attention (diffusers' PixArt
                           # PAG default applies to "blocks.1")
REPORTED = ("accuracy", "colour_accuracy", "shape_accuracy", "two_object_accuracy", "two_object_recall",
            "colour_fidelity", "seconds")


def save(result: dict) -> None:
    """Write what is known so far (the search first, then each held-out configuration as it finishes)."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")


torch.manual_seed(0)
started = time.monotonic()
pipe = load_pipeline(PIPELINE)
candidates = perturbable_heads(pipe.transformer)
objective = lab_objective(pipe, samples=SEARCH_SAMPLES, steps=SEARCH_STEPS, guidance=GUIDANCE,
                          seed=SEARCH_NOISE_SEED, alpha=ALPHA, scale=SCALE, metric=METRIC,
                          scene_seed=SEARCH_SCENE_SEED)
found = headhunter(objective, candidates, rounds=ROUNDS, progress=True)
result = {"settings": {key: value for key, value in globals().items() if key.isupper() and key != "OUT"},
          "candidates": len(candidates), "headhunter": found.to_dict(),
          "search_seconds": time.monotonic() - started, "held_out": {}}
save(result)
print("headhunter", json.dumps({"chosen": found.chosen, "scores": found.scores, "baseline": found.baseline}),
      flush=True)

table = DiffusionSession(pipe.transformer).layer_table()  # layer -> block
pag_layer = next(layer for layer, block in zip(table.layer, table.block) if block == PAG_BLOCK
                 and (layer, 0) in candidates)
configs = {  # name: (guidance, heads, alpha)
    "cfg": (GUIDANCE, [], ALPHA),
    f"cfg+softpag layer {pag_layer} (all heads)": (GUIDANCE, [p for p in candidates if p[0] == pag_layer], ALPHA),
    "cfg+softpag headhunter": (GUIDANCE, found.chosen, ALPHA),
    f"cfg+softpag headhunter alpha={SOFT_ALPHA}": (GUIDANCE, found.chosen, SOFT_ALPHA),
    "no cfg": (1.0, [], ALPHA),
    "no cfg+softpag headhunter": (1.0, found.chosen, ALPHA),
}
for name, (guidance, heads, alpha) in configs.items():
    report = evaluate_pipeline(pipe, samples=EVAL_SAMPLES, steps=EVAL_STEPS, guidance=guidance, seed=EVAL_NOISE_SEED,
                               predict=lab_predictor(pipe, heads, alpha=alpha, scale=SCALE), progress=True)
    result["held_out"][name] = {"guidance": guidance, "heads": [list(h) for h in heads], "alpha": alpha,
                                **{key: report[key] for key in REPORTED}}
    result["real_accuracy"] = report.get("real_accuracy")
    result["seconds"] = time.monotonic() - started
    save(result)
    print(name, json.dumps(result["held_out"][name]), flush=True)
