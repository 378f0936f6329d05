"""ProfilingDiT, A-STAR and RefAM measured on the DiT lab's trained PixArt image model (docs/dit_lab.md, issue 17).

    OMP_NUM_THREADS=2 python \
        examples/dit_image_findings.py --model runs/dit17/image --out runs/dit17/findings_image.json

Settings, fixed before any run on the reference model (none tuned on its results). One seed (0) everywhere: the
noise of the noised test pictures, the sampler's starting noise and nothing else random. The test items are the
lab's fixed `eval_scenes("image", 48)` (seed 170000017): 48 one-object scenes (items 0–47) and 48 two-object scenes
(items 48–95), with their captions and true pixel masks. Sampling is the lab's sampler: 20 Euler steps, CFG 3.0,
the 48 captions in one batch, noise seed 0. Scores are `attnlab.lab.dit.evaluate.image_scores` (the lab's CNN
classifier and foreground-colour fidelity).

Patch masks: the model sees 8 × 8 patches of 4 × 4 px. A patch is foreground when at least half of its 16 pixels are
in the true mask (if no patch qualifies, the patch with the most mask pixels). "Noised to t = 0.5" is the lab's
rectified-flow convention: `x_t = 0.5·x0 + 0.5·noise` (x0 in [-1, 1]), `timestep = 500`, one conditional forward.

1. ProfilingDiT (Ma et al. 2025, METHODS.md #44; `attnlab.diffusion.profiling`). Profile: the `fg_profile` probe on
   each of the 48 one-object scenes noised to t = 0.5 with its caption and its patch mask, one forward each; per
   block the mean over its profiled layers (the self-attention layers: the only ones with image keys) of
   `logit(fg_share) − logit(fg_area)`, then the mean over the 48 scenes; `classify_blocks` with margin 0. Caching:
   `BlockCache(cached_blocks = the background blocks, step_start 6, interval 6, mode "delta")` (the released
   defaults) against plain sampling, on the 48 one-object captions: `image_scores` accuracy and colour_fidelity,
   the cache report (block evaluations skipped), the mean absolute pixel difference to the plain images, and wall
   time = the median of 3 full sampling runs of each (alternating plain, cached, in this process).
2. A-STAR (Agarwal et al. 2023, METHODS.md #43; `attnlab.diffusion.astar`). The 48 two-object captions (`a C1 S1 and
   a C2 S2`). Concepts: the two objects; concept k's map is the mean of the cross-attention maps of its colour word
   and its shape noun (maps averaged over every cross-attention layer, the conditional CFG forward). Our choice: the
   module's losses take one map per concept, and treating the four words as four concepts would make the
   segregation loss push each colour word away from its own noun. Losses and update are the module's (soft IoU of
   max-normalised maps; retention against the previous step's maps at ≥ 0.5 of their peak; one gradient step
   `z ← z − α_t ∇z (L_seg + L_ret)` per denoising step on the caption's forward, then the usual CFG step from the
   updated latent), with the module's default schedule `step_sizes(20)`: α from 20 down to 10 over the first 10 of
   the 20 steps, none after. Reported: `two_object_accuracy`, `two_object_recall` of plain and A-STAR samples, and
   per step the mean segregation and retention losses measured on the conditional forward of each run (A-STAR:
   after its update), plus the update's size.
3. RefAM (Kukleva et al. 2025, METHODS.md #16, low confidence; `attnlab.probes.refam`). The 48 one-object scenes
   noised to t = 0.5 with their captions, one forward each, the `refam` probe over every cross-attention layer.
   Grounding map: the mean over content tokens (all words minus magnets, i.e. the stop words `a`/`the` and the
   padding, minus the tokens its GAS rule flags in any cross layer), min–max normalised. Point-in-mask: the map's
   peak patch is foreground in the patch mask (also reported: the peak patch holds any object pixel); IoU of
   `threshold_mask` (≥ 0.5 of the peak) against the patch mask. Variants: (a) every caption word's map averaged
   (no exclusion); (b) the caption with extra stop words appended (`append_stop_words` with the words of its
   default list that the lab's vocabulary has, `the and a`), magnets and GAS excluded as in the main variant.
   Chance references: a uniformly random peak hits with probability = the mean patch-mask area.

Control: the same command with ``--model`` an untrained model of the same size (``save_pipeline(LabPipeline.build(
DitSpec(), seed=0), dir)``) separates what training put into the attention from what the architecture gives.

`--quick`: 4 items per kind and 3 sampling steps, with the cache schedule scaled to step_start 1, interval 2 so the
cache path runs (a smoke test, not a measurement). The script writes JSON to --out and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnlab.diffusion import DiffusionSession
from attnlab.diffusion.astar import (CrossMapRecorder, astar_update, binarise, latent_gradient, retention_loss,
                                     segregation_loss, step_sizes)
from attnlab.diffusion.profiling import BlockCache, block_preference, classify_blocks
from attnlab.lab.dit.evaluate import eval_scenes, image_scores
from attnlab.lab.dit.pipeline import LabPipeline, load_pipeline
from attnlab.lab.dit.scenes import COLOURS, SHAPES, Drawn
from attnlab.probes import PROBES
from attnlab.probes.refam_maps import (DEFAULT_EXTRA_STOP_WORDS, append_stop_words, grounding_map, magnet_indices,
                                       peak_point, threshold_mask)

# ---- fixed settings (decided before the runs) -------------------------------------------------------------------
SEED = 0
ITEMS = 48
STEPS = 20
GUIDANCE = 3.0
T_NOISE = 0.5
PATCH_FRACTION = 0.5  # a patch is foreground when at least this share of its pixels is in the true mask
MARGIN = 0.0
CACHE = {"step_start": 6, "interval": 6}  # the released ProfilingDiT defaults
TIMING_RUNS = 3
CONCEPTS = ((0, 1), (2, 3))  # kept recorder tokens (colour, shape) of object 1 and of object 2
QUICK = {"items": 4, "steps": 3, "cache": {"step_start": 1, "interval": 2}}
LAB_STOP_WORDS = ("a", "the", "and")


# ---- shared pieces ----------------------------------------------------------------------------------------------
def patch_masks(items: list[Drawn], patch: int) -> tuple[Tensor, Tensor]:
    """(n, 1, R, C) bool patch masks of each scene's objects: (majority rule of the module doc, any pixel)."""
    pixels = torch.from_numpy(np.stack([d.masks.any(axis=0) for d in items])).float()  # (n, 32, 32)
    n, size = pixels.shape[0], pixels.shape[-1]
    share = pixels.view(n, size // patch, patch, size // patch, patch).mean(dim=(2, 4))  # (n, R, C)
    major = share >= PATCH_FRACTION
    for row in range(n):
        if not bool(major[row].any()):
            major[row].view(-1)[int(share[row].argmax())] = True
    return major[:, None], (share > 0)[:, None]


def noised(items: list[Drawn], t: float, seed: int) -> Tensor:
    """(n, 3, 32, 32) float32: ``(1 − t)·x0 + t·noise`` of the scenes' pictures, noise from a CPU generator."""
    x0 = torch.from_numpy(np.stack([d.image for d in items])).float().div(255).movedim(-1, 1) * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return (1 - t) * x0 + t * noise


def caption(item: Drawn) -> str:
    return " ".join(item.caption)


def cross_layers(pipe: LabPipeline) -> list[int]:
    """The attention layers whose calls are cross-attention (one forward in a probeless session)."""
    hidden, keep = pipe.encode(["a red circle"])
    with torch.no_grad(), DiffusionSession(pipe.transformer) as session:
        pipe.velocity(torch.zeros(1, 3, 32, 32), T_NOISE, hidden, keep)
    table = session.layer_table()
    return [int(layer) for layer, kind in zip(table.layer, table.kind) if kind == "cross"]


def scores(images: Tensor, items: list[Drawn], keys: tuple[str, ...]) -> dict[str, float]:
    found = image_scores(images, items)
    return {key: found[key] for key in keys}


def nanmean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


# ---- 1. ProfilingDiT --------------------------------------------------------------------------------------------
def profiling(pipe: LabPipeline, items: list[Drawn], steps: int, cache: dict[str, int]) -> dict[str, Any]:
    masks, _ = patch_masks(items, pipe.spec.patch_size)
    x = noised(items, T_NOISE, SEED)
    per_scene: list[dict[int, float]] = []
    for row, item in enumerate(items):
        probe = PROBES.get("fg_profile")(foreground=masks[row])
        hidden, keep = pipe.encode([caption(item)])
        with torch.no_grad(), DiffusionSession(pipe.transformer, probes=[probe], per_step=False) as session:
            pipe.velocity(x[row:row + 1], T_NOISE, hidden, keep)
        fed = session.probe("fg_profile")
        prefs = fed.preferences()
        layer_pref = {layer: float(prefs[layer]) for layer in fed.layer_block if not math.isnan(float(prefs[layer]))}
        per_scene.append(block_preference(layer_pref, fed.layer_block))
    blocks = sorted({b for scene in per_scene for b in scene})
    mean = {b: nanmean([scene.get(b, float("nan")) for scene in per_scene]) for b in blocks}
    classes = classify_blocks(mean, MARGIN)
    background = [b for b, c in classes.items() if c == "background"]
    profile = [{"block": b, "preference": mean[b],
                "std": statistics.pstdev([s[b] for s in per_scene if b in s]),
                "share_background": sum(s[b] < 0 for s in per_scene if b in s) / len(per_scene),
                "class": classes[b]} for b in blocks]

    captions = [caption(d) for d in items]
    times: dict[str, list[float]] = {"plain": [], "cached": []}
    images: dict[str, Tensor] = {}
    report: dict[str, Any] = {}
    for _ in range(TIMING_RUNS):
        for name in ("plain", "cached"):
            started = time.perf_counter()
            if name == "plain":
                out = pipe.sample(captions, steps=steps, guidance=GUIDANCE, seed=SEED)
            else:
                with BlockCache(pipe.transformer, cached_blocks=background, **cache) as block_cache:
                    out = pipe.sample(captions, steps=steps, guidance=GUIDANCE, seed=SEED)
                report = block_cache.report()
            times[name].append(time.perf_counter() - started)
            images.setdefault(name, out)
    keys = ("accuracy", "colour_accuracy", "shape_accuracy", "colour_fidelity")
    sampling = {name: {**scores(images[name], items, keys), "seconds_median": statistics.median(times[name]),
                       "seconds": times[name]} for name in images}
    sampling["cached"]["mean_abs_pixel_diff_to_plain"] = float((images["cached"] - images["plain"]).abs().mean())
    report["per_block"] = {str(k): v for k, v in report.get("per_block", {}).items()}
    return {"profile": profile, "background_blocks": background, "cache_report": report, "sampling": sampling,
            "speedup": sampling["plain"]["seconds_median"] / sampling["cached"]["seconds_median"]}


# ---- 2. A-STAR --------------------------------------------------------------------------------------------------
def concept_tokens(item: Drawn) -> tuple[int, ...]:
    """Caption positions of (colour 1, shape 1, colour 2, shape 2)."""
    words = list(item.caption)
    colours = [i for i, w in enumerate(words) if w in COLOURS]
    shapes = [i for i, w in enumerate(words) if w in SHAPES]
    return colours[0], shapes[0], colours[1], shapes[1]


def merged(maps: Tensor) -> Tensor:
    """(B, 4, F, R, C) maps of the kept words → (B, 2, F, R, C): each object's colour and shape maps averaged."""
    return torch.stack([maps[:, list(pair)].mean(dim=1) for pair in CONCEPTS], dim=1)


def astar_run(pipe: LabPipeline, captions: list[str], tokens: tuple[int, ...], layers: list[int], steps: int,
              update: bool) -> tuple[Tensor, list[dict[str, float]]]:
    """Sample the captions (plain, or with A-STAR's latent updates) and measure both losses per step."""
    trace = CrossMapRecorder(layers=layers, tokens=tokens, detach=True)
    grad_maps = CrossMapRecorder(layers=layers, tokens=tokens)
    times = torch.linspace(1, 0, steps + 1).tolist()  # the sampler's grid
    alphas = step_sizes(steps)
    state: dict[str, Any] = {"masks": None}
    rows: list[dict[str, float]] = []

    def predict(x: Tensor, t: float, cond: Any) -> Tensor:
        i = min(range(steps), key=lambda k: abs(times[k] - t))
        moved, loss, size = x, float("nan"), 0.0
        if update and alphas[i] > 0:
            def maps_of(z: Tensor) -> Tensor:
                grad_maps.reset()
                pipe.velocity(z, t, cond.hidden, cond.keep)
                return merged(grad_maps.maps(i))
            losses, grad = latent_gradient(maps_of, x, [0, 1], state["masks"])
            moved = astar_update(x, grad, alphas[i])
            loss, size = float(losses.mean()), float((moved - x).pow(2).mean().sqrt())
            grad_maps.reset()
        velocity = pipe.cfg_velocity(moved, t, cond)
        # the caption's forward of this step: the last one recorded (the null caption's forward has one text key,
        # which is no concept, so the recorder skips it; an A-STAR step also recorded its gradient forward first)
        recorded = {len(v) for (s, _), v in trace.records.items() if s == i}
        if recorded != {2 if moved is not x else 1}:
            raise SystemExit(f"step {i}: expected the caption's forward(s) only in the trace, got {recorded}")
        maps = merged(trace.maps(i, forward=-1)).double()
        seg = segregation_loss(maps, [0, 1])
        ret = retention_loss(maps, [0, 1], state["masks"]) if state["masks"] is not None else None
        state["masks"] = binarise(maps, [0, 1])
        rows.append({"step": i, "alpha": alphas[i] if update else 0.0, "segregation": float(seg.mean()),
                     "retention": float(ret.mean()) if ret is not None else float("nan"),
                     "update_loss": loss, "update_rms": size, "latent_rms": float(x.pow(2).mean().sqrt())})
        # the sampler steps x ← x − dt·v; returning this v makes it step from the updated latent instead
        return velocity + (x - moved) / (times[i] - times[i + 1])

    edits = [trace, grad_maps] if update else [trace]
    with DiffusionSession(pipe.transformer, edits=edits):
        images = pipe.sample(captions, steps=steps, guidance=GUIDANCE, seed=SEED, predict=predict)
    return images, rows


def astar(pipe: LabPipeline, items: list[Drawn], layers: list[int], steps: int) -> dict[str, Any]:
    tokens = {concept_tokens(d) for d in items}
    if len(tokens) != 1:
        raise SystemExit(f"two-object captions place their words differently: {sorted(tokens)}")
    token = tokens.pop()
    captions = [caption(d) for d in items]
    out: dict[str, Any] = {"concept_tokens": list(token), "step_sizes": step_sizes(steps)}
    for name, update in (("plain", False), ("astar", True)):
        images, rows = astar_run(pipe, captions, token, layers, steps, update)
        out[name] = {**scores(images, items, ("two_object_accuracy", "two_object_recall")), "per_step": rows,
                     "mean_segregation": nanmean([r["segregation"] for r in rows]),
                     "mean_retention": nanmean([r["retention"] for r in rows])}
    return out


# ---- 3. RefAM ---------------------------------------------------------------------------------------------------
def refam(pipe: LabPipeline, items: list[Drawn], layers: list[int]) -> dict[str, Any]:
    majority, touched = patch_masks(items, pipe.spec.patch_size)
    x = noised(items, T_NOISE, SEED)
    extra = tuple(w for w in DEFAULT_EXTRA_STOP_WORDS if w in LAB_STOP_WORDS)
    width = pipe.spec.max_words
    out: dict[str, Any] = {"extra_stop_words": list(extra),
                           "chance_point_in_mask": float(majority.float().mean()),
                           "chance_touch": float(touched.float().mean())}
    for variant in ("content", "all_tokens", "appended"):
        hits, touches, ious, gas_counts, failed = [], [], [], [], 0
        gas_words: Counter[str] = Counter()
        for row, item in enumerate(items):
            text = append_stop_words(caption(item), extra) if variant == "appended" else caption(item)
            words = text.split()
            tokens = words + ["<pad>"] * (width - len(words))
            probe = PROBES.get("refam")(magnets=magnet_indices(tokens), layers=layers)
            hidden, keep = pipe.encode([text])
            with torch.no_grad(), DiffusionSession(pipe.transformer, probes=[probe], per_step=False) as session:
                pipe.velocity(x[row:row + 1], T_NOISE, hidden, keep)
            fed = session.probe("refam")
            found = fed.grounding()
            if found is None:
                failed += 1
                hits.append(False), touches.append(False), ious.append(0.0)
                continue
            gas = [t for t in found["gas_tokens"] if t < len(words)]
            gas_counts.append(len(gas))
            gas_words.update(words[t] for t in gas)
            if variant == "all_tokens":
                grid = tuple(found["grid"])
                g = grounding_map(fed.token_map.reshape(fed.token_map.shape[0], *grid), list(range(len(words))))
            else:
                g = torch.tensor(found["grounding"], dtype=torch.float64)
            _, r, c = (int(v) for v in peak_point(g))
            truth = majority[row]
            hits.append(bool(truth[0, r, c]))
            touches.append(bool(touched[row][0, r, c]))
            pred = threshold_mask(g)
            ious.append(float((pred & truth).sum()) / max(1, int((pred | truth).sum())))
        out[variant] = {"point_in_mask": float(np.mean(hits)), "peak_touches_object": float(np.mean(touches)),
                        "iou": float(np.mean(ious)), "gas_tokens_per_caption": nanmean(gas_counts),
                        "gas_words": dict(gas_words), "no_map": failed}
    return out


# ---- report -----------------------------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def markdown(result: dict[str, Any]) -> str:
    p, a, r = result["profiling"], result["astar"], result["refam"]
    cache = p["cache_report"]
    parts = ["### ProfilingDiT: block profile (t = 0.5, one-object test scenes)",
             table(["block", "fg preference (mean)", "std over scenes", "share of scenes < 0", "class"],
                   [[b["block"], b["preference"], b["std"], b["share_background"], b["class"]] for b in p["profile"]]),
             "", "### ProfilingDiT: BlockCache vs plain sampling",
             table(["run", "accuracy", "colour acc.", "shape acc.", "colour fidelity", "seconds (median of 3)",
                    "block evals skipped"],
                   [["plain", *[p["sampling"]["plain"][k] for k in ("accuracy", "colour_accuracy", "shape_accuracy",
                                                                     "colour_fidelity", "seconds_median")], "0"],
                    [f"cached (blocks {p['background_blocks']})",
                     *[p["sampling"]["cached"][k] for k in ("accuracy", "colour_accuracy", "shape_accuracy",
                                                             "colour_fidelity", "seconds_median")],
                     f"{cache['skipped']}/{cache['skipped'] + cache['evaluated']} ({cache['skipped_fraction']:.3f})"]]),
             f"\nSpeed-up (plain / cached median): {p['speedup']:.3f}; mean |pixel diff| cached vs plain: "
             f"{p['sampling']['cached']['mean_abs_pixel_diff_to_plain']:.4f}",
             "", "### A-STAR: two-object captions",
             table(["run", "two_object_accuracy", "two_object_recall", "mean segregation", "mean retention"],
                   [[n, a[n]["two_object_accuracy"], a[n]["two_object_recall"], a[n]["mean_segregation"],
                     a[n]["mean_retention"]] for n in ("plain", "astar")]),
             "", table(["step", "alpha", "seg. plain", "seg. A-STAR", "ret. plain", "ret. A-STAR", "update rms"],
                       [[x["step"], y["alpha"], x["segregation"], y["segregation"], x["retention"], y["retention"],
                         y["update_rms"]] for x, y in zip(a["plain"]["per_step"], a["astar"]["per_step"])]),
             "", "### RefAM: grounding on one-object test scenes (t = 0.5)",
             table(["map", "point-in-mask", "peak touches object", "IoU (threshold 0.5)", "GAS per caption",
                    "GAS words"],
                   [[n, r[n]["point_in_mask"], r[n]["peak_touches_object"], r[n]["iou"],
                     r[n]["gas_tokens_per_caption"], r[n]["gas_words"] or "-"]
                    for n in ("content", "all_tokens", "appended")]),
             f"\nChance: point-in-mask {r['chance_point_in_mask']:.3f} (mean patch-mask area), peak touches object "
             f"{r['chance_touch']:.3f}."]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("runs/dit17/image"),
                        help="A lab DiT image folder (attnlab dit train --out, or a save_pipeline folder).")
    parser.add_argument("--out", type=Path, required=True, help="JSON output file.")
    parser.add_argument("--quick", action="store_true", help="4 items, 3 steps: a smoke test.")
    args = parser.parse_args()
    items_n, steps = (QUICK["items"], QUICK["steps"]) if args.quick else (ITEMS, STEPS)
    cache = QUICK["cache"] if args.quick else CACHE
    torch.manual_seed(SEED)
    pipe = load_pipeline(args.model)
    if pipe.kind != "image":
        raise SystemExit(f"{args.model} holds a {pipe.kind} model; this script measures the image model")
    items = eval_scenes("image", items_n)
    one, two = items[:items_n], items[items_n:]
    layers = cross_layers(pipe)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "model": str(args.model), "quick": args.quick, "torch_threads": torch.get_num_threads(),
        "settings": {"seed": SEED, "items_per_kind": items_n, "steps": steps, "guidance": GUIDANCE, "t_noise": T_NOISE,
                     "patch_fraction": PATCH_FRACTION, "margin": MARGIN, "cache": cache, "timing_runs": TIMING_RUNS,
                     "cross_layers": layers}}
    result["profiling"] = profiling(pipe, one, steps, cache)
    result["astar"] = astar(pipe, two, layers, steps)
    result["refam"] = refam(pipe, one, layers)
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    print(markdown(result))
    print(f"\n{result['seconds']:.0f} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
