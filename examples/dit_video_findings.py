"""Radial attention and UltraViCo on the DiT lab's trained Wan video model (issue 17; docs/findings.md).

    OMP_NUM_THREADS=2 \\
        python examples/dit_video_findings.py --model runs/dit17/video --out runs/dit17/findings_video.json
    python examples/dit_video_findings.py --model tiny-video --out /tmp/f.json --quick     # smoke test

Settings, fixed before any run on the reference model (nothing below was tuned on its results):

- Model: the lab's video model (``attnlab dit train --video``; a ``WanTransformer3DModel``, 4 blocks × 4 heads × 32,
  patch (1, 4, 4) → 64 patch tokens per frame), trained on 4-frame videos (``spec.frames``; the script stops if the
  model says otherwise).
- Test items: ``eval_scenes("video", 48, frames=F)`` (the lab's fixed test seed; item i has the same caption and
  motion at every F). One batch of 48, 20 Euler steps, CFG 3.0, noise seed 0 (:meth:`LabPipeline.sample`), scored
  with the lab's ``video_scores`` (classifier frame accuracy, split at F > 4 into frames 0–3 ``trained`` and frames
  ≥ 4 ``beyond``; ``track_rmse``, ``direction_accuracy``, ``speed``, ``track_found``). The same scores of the real
  test videos (``real``, the ceiling) and the mean per-video PSNR (dB, pixels in [0, 1]) of each edited sample
  against the dense (unedited) sample of the same F, noise and captions.
- Radial attention (Li et al. 2025, METHODS.md #10), the Wan2.1 1× defaults with the dense steps scaled from 12 of
  50 to 5 of 20 (``dense_steps`` = a quarter of the steps, rounded):
  ``radial:decay_factor=0.2,dense_steps=5,dense_layers=1,sink_frames=1,block_size=none``, at F = 4 (the trained
  length) and F = 8, against dense. Its cost: the mask density (kept (query, key) patch pairs / all pairs of one
  self-attention call, counted from the mask the edit builds, :func:`attnlab.functional.sparse_masks.radial` with
  the edit's arguments), the density averaged over a sample's self-attention calls (dense steps and the dense block
  at 1), and the time of one transformer forward (batch 48, the conditional forward; median of 5 after one warm-up;
  dense = the model's own SDPA without a session, radial = the masked path inside a DiffusionSession at a step past
  the dense steps), both in this run.
- UltraViCo (Zhao et al. 2026, METHODS.md #12): ``ultravico:alpha=0.9,train_frames=4`` (the first-frame rule on,
  its default) against plain sampling at F = 8 and F = 12 (2× and 3× the trained length); ``alpha=0.7`` at F = 8 as
  the one sensitivity point.
- One seed (noise seed 0, one model): no error bars; differences of one or two videos out of 48 (2–4 points) are
  within noise.

``frame acc`` at F > 4 is the frame-weighted mean of the two parts. The variants run in the order of
:data:`VARIANTS` and the JSON is rewritten after each (``"complete": false`` until the end), so an interrupted run
keeps what finished. ``--quick``: 4 items and 3 steps (dense_steps 1), for smoke tests on an untrained model; the
numbers mean nothing. Writes every number to ``--out`` (JSON) and prints markdown tables; ``--table`` prints the
tables of an existing ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from attnlab.diffusion import DiffusionSession
from attnlab.functional.sparse_masks import radial
from attnlab.lab.dit.evaluate import real_scores, eval_scenes, video_scores
from attnlab.lab.dit.pipeline import LabPipeline, load_pipeline

# ---- fixed settings (decided before the runs) -------------------------------------------------------------------
SAMPLES, STEPS, GUIDANCE, SEED = 48, 20, 3.0, 0
QUICK_SAMPLES, QUICK_STEPS = 4, 3
TRAIN_FRAMES = 4
TIMING_REPEATS = 5
RADIAL = ("radial:decay_factor=0.2,dense_steps={dense_steps},dense_layers=1,sink_frames=1,block_size=none")
RADIAL_ARGS = dict(decay_factor=0.2, dense_layers=1, sink_frames=1)  # the same, for the density count
ULTRAVICO = "ultravico:alpha={alpha},train_frames=" + str(TRAIN_FRAMES)
# (variant, frames, edit template or None), in the order they run (the JSON is rewritten after each, so an
# interrupted run keeps what finished; radial's cost is measured right after its runs, the sensitivity point last);
# every edited variant is compared with "dense" at the same frames
VARIANTS: list[tuple[str, int, str | None]] = [
    ("dense", 4, None), ("radial", 4, RADIAL),
    ("dense", 8, None), ("radial", 8, RADIAL),
    ("ultravico a=0.9", 8, ULTRAVICO.format(alpha=0.9)),
    ("dense", 12, None), ("ultravico a=0.9", 12, ULTRAVICO.format(alpha=0.9)),
    ("ultravico a=0.7", 8, ULTRAVICO.format(alpha=0.7)),
]
RADIAL_FRAMES = (4, 8)
SCORES = ("frame_accuracy", "frame_accuracy_trained", "frame_accuracy_beyond", "track_rmse", "direction_accuracy",
          "speed", "track_found")


def dense_steps(steps: int) -> int:
    """Radial's dense steps: a quarter of the sampling steps, rounded (5 of 20; the Wan script's 12 of 50)."""
    return max(1, int(steps / 4 + 0.5))


def plain_scores(videos: torch.Tensor, items: list, frames: int, masks: torch.Tensor | None = None) -> dict:
    """``video_scores`` without the ``_f{F}`` suffix, plus ``frame_accuracy`` over all frames at F > 4 (the
    frame-weighted mean of the trained and beyond parts)."""
    raw = video_scores(videos, items, TRAIN_FRAMES, masks)
    scores = {name[: -len(f"_f{frames}")]: value for name, value in raw.items()}
    if "frame_accuracy" not in scores:
        scores["frame_accuracy"] = (TRAIN_FRAMES * scores["frame_accuracy_trained"]
                                    + (frames - TRAIN_FRAMES) * scores["frame_accuracy_beyond"]) / frames
    return scores


def psnr(videos: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over videos of ``10·log10(1 / MSE)`` (pixels in [0, 1]); an identical video counts 100 dB."""
    mse = (videos - reference).pow(2).flatten(1).mean(dim=1)
    return float(torch.where(mse > 0, -10 * torch.log10(mse.clamp_min(1e-10)), torch.tensor(100.0)).mean())


def sample(pipe: LabPipeline, captions: list[str], frames: int, steps: int, edit: str | None
           ) -> tuple[torch.Tensor, dict[str, Any]]:
    """One batch of videos, with ``edit`` inside a DiffusionSession (or none); the edit report as a dict."""
    started = time.monotonic()
    if edit is None:
        videos = pipe.sample(captions, steps=steps, guidance=GUIDANCE, seed=SEED, frames=frames)
        return videos, {"seconds": time.monotonic() - started}
    with DiffusionSession(pipe.transformer, edits=[edit]) as session:
        videos = pipe.sample(captions, steps=steps, guidance=GUIDANCE, seed=SEED, frames=frames)
    row = session.edit_report().iloc[0].to_dict()
    report = {key: (value if isinstance(value, (int, float, str, bool)) or value is None else str(value))
              for key, value in row.items()}
    report["skipped"] = session.edits[0].skip_summary()
    return videos, {"seconds": time.monotonic() - started, "edit_report": report}


def radial_density(frames: int, tokens_per_frame: int, steps: int, blocks: int) -> dict[str, float]:
    """Kept share of (query, key) patch pairs of one radial self call, and averaged over a sample's self calls."""
    mask_mod = radial(frames, tokens_per_frame, **{k: v for k, v in RADIAL_ARGS.items() if k != "dense_layers"})
    index = torch.arange(frames * tokens_per_frame)
    zero = torch.zeros((), dtype=torch.long)
    density = float(mask_mod(zero, zero, index[:, None], index[None, :]).float().mean())
    sparse_share = (1 - dense_steps(steps) / steps) * (1 - RADIAL_ARGS["dense_layers"] / blocks)
    return {"frames": frames, "tokens": frames * tokens_per_frame, "density": density,
            "sample_density": 1 - sparse_share * (1 - density)}


def time_forward(pipe: LabPipeline, captions: list[str], frames: int, steps: int, edit: str | None) -> float:
    """Median seconds of one conditional transformer forward (batch = len(captions)) over TIMING_REPEATS after a
    warm-up; with ``edit`` inside a DiffusionSession at the last denoising step (past radial's dense steps)."""
    hidden, keep = pipe.encode(captions)
    x = pipe.noise(len(captions), seed=SEED, frames=frames)
    kwargs = pipe.forward_kwargs(x, 0.5, hidden, keep)

    def run() -> list[float]:
        times = []
        for _ in range(TIMING_REPEATS + 1):
            started = time.perf_counter()
            pipe.transformer(**kwargs)
            times.append(time.perf_counter() - started)
        return times[1:]

    with torch.no_grad():
        if edit is None:
            return statistics.median(run())
        with DiffusionSession(pipe.transformer, edits=[edit]) as session:
            session.set_step(steps - 1)
            return statistics.median(run())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/dit17/video", help="the video model (a lab DiT folder)")
    parser.add_argument("--out", required=True, help="JSON output file")
    parser.add_argument("--table", action="store_true", help="only print the tables of an existing --out JSON")
    parser.add_argument("--quick", action="store_true", help="4 items, 3 steps (smoke test)")
    args = parser.parse_args(argv)
    if args.table:
        report = json.loads(Path(args.out).read_text(encoding="utf-8"))
        print(markdown(report))
        return report
    samples, steps = (QUICK_SAMPLES, QUICK_STEPS) if args.quick else (SAMPLES, STEPS)
    started = time.monotonic()
    pipe = load_pipeline(args.model)
    if pipe.kind != "video" or int(pipe.spec.frames) != TRAIN_FRAMES:
        sys.exit(f"error: expected a video model trained on {TRAIN_FRAMES} frames, got kind={pipe.kind} "
                 f"frames={pipe.spec.frames}")
    blocks = len(pipe.transformer.blocks)
    radial_edit = RADIAL.format(dense_steps=dense_steps(steps))
    report: dict[str, Any] = {
        "settings": {"model": str(args.model), "quick": args.quick, "samples": samples, "steps": steps,
                     "guidance": GUIDANCE, "noise_seed": SEED, "seeds": 1, "train_frames": TRAIN_FRAMES,
                     "radial": radial_edit, "ultravico": [ULTRAVICO.format(alpha=a) for a in (0.9, 0.7)],
                     "timing_repeats": TIMING_REPEATS, "torch_threads": torch.get_num_threads(),
                     "spec": pipe.spec.to_dict(), "training": pipe.lab.get("train")},
        "runs": [], "radial_cost": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(done: bool) -> None:
        report["complete"], report["seconds"] = done, time.monotonic() - started
        out.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")

    dense_videos: dict[int, torch.Tensor] = {}
    for index, (variant, frames, template) in enumerate(VARIANTS):
        items = eval_scenes("video", samples, frames=frames)
        captions = [" ".join(item.caption) for item in items]
        edit = None if template is None else template.format(dense_steps=dense_steps(steps))
        print(f"[{time.monotonic() - started:6.0f} s] {variant} at {frames} frames", file=sys.stderr, flush=True)
        videos, extra = sample(pipe, captions, frames, steps, edit)
        row = {"variant": variant, "frames": frames, "edit": edit, **plain_scores(videos, items, frames), **extra}
        if edit is None:
            dense_videos[frames] = videos
            real = real_scores("video", items, [frames], TRAIN_FRAMES)
            row["real"] = {name[: -len(f"_f{frames}")]: value for name, value in real.items()}
        else:
            row["psnr_vs_dense"] = psnr(videos, dense_videos[frames])
        report["runs"].append(row)
        save(False)
        if variant == "radial" and frames == max(RADIAL_FRAMES):
            for cost_frames in RADIAL_FRAMES:
                print(f"[{time.monotonic() - started:6.0f} s] timing at {cost_frames} frames", file=sys.stderr,
                      flush=True)
                report["radial_cost"].append(radial_cost(pipe, samples, cost_frames, steps, blocks, radial_edit))
            save(False)
    save(True)
    print(markdown(report))
    return report


def radial_cost(pipe: LabPipeline, samples: int, frames: int, steps: int, blocks: int, edit: str) -> dict[str, Any]:
    """Radial's mask density and forward times at ``frames`` (see the module doc)."""
    captions = [" ".join(item.caption) for item in eval_scenes("video", samples, frames=frames)]
    cost: dict[str, Any] = radial_density(frames, pipe.spec.grid ** 2, steps, blocks)
    cost["batch"] = len(captions)
    cost["dense_forward_s"] = time_forward(pipe, captions, frames, steps, None)
    cost["radial_forward_s"] = time_forward(pipe, captions, frames, steps, edit)
    cost["radial_over_dense"] = cost["radial_forward_s"] / cost["dense_forward_s"]
    return cost


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report's tables: quality per variant (with the real-video ceiling per F) and radial's cost."""
    lines = ["| variant | F | frame acc | frames 0–3 | frames ≥ 4 | track RMSE (px) | direction acc | speed (px/f) "
             "| PSNR vs dense (dB) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(report["runs"], key=lambda r: r["frames"]):  # stable: dense first at each F
        real = [{"variant": "real videos", "frames": row["frames"], **row["real"]}] if "real" in row else []
        for r in real + [row]:
            beyond = r["frames"] > TRAIN_FRAMES
            lines.append(f"| {r['variant']} | {r['frames']} | {_fmt(r.get('frame_accuracy'))} | "
                         f"{_fmt(r.get('frame_accuracy_trained') if beyond else None)} | "
                         f"{_fmt(r.get('frame_accuracy_beyond') if beyond else None)} | {_fmt(r.get('track_rmse'))} | "
                         f"{_fmt(r.get('direction_accuracy'))} | {_fmt(r.get('speed'))} | "
                         f"{_fmt(r.get('psnr_vs_dense'), 1)} |")
    lines += ["", "| F | patch tokens | radial mask density | density over a sample | dense forward (ms) "
              "| radial forward (ms) | radial / dense |", "|---|---|---|---|---|---|---|"]
    for c in report["radial_cost"]:
        lines.append(f"| {c['frames']} | {c['tokens']} | {c['density']:.3f} | {c['sample_density']:.3f} | "
                     f"{1000 * c['dense_forward_s']:.0f} | {1000 * c['radial_forward_s']:.0f} | "
                     f"{c['radial_over_dense']:.2f} |")
    settings = report["settings"]
    complete = "" if report.get("complete", True) else " INCOMPLETE RUN (interrupted): only the rows above finished."
    lines += ["", f"{settings['samples']} test videos, {settings['steps']} Euler steps, CFG {settings['guidance']}, "
                  f"noise seed {settings['noise_seed']} (one seed); forward times: median of "
                  f"{settings['timing_repeats']}, batch {settings['samples']}, {settings['torch_threads']} CPU "
                  f"threads.{complete}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
