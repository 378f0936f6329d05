"""Train a lab DiT by rectified flow on synthetic scenes: ``attnlab dit train [--video] --out DIR``.

    from attnlab.lab.dit.train import DitTrainConfig, train_dit
    record = train_dit(DitTrainConfig(kind="image", out="runs/dit"), progress=True)
    record["train"]["loss_last_50"], record["train"]["seconds"]

What one run does:

- model: :meth:`attnlab.lab.dit.pipeline.LabPipeline.build` of ``spec`` (seeded with ``seed``), all trained;
- data: update ``s`` (1-based) draws ``batch_size`` items from ``batch_rng(seed, s − 1, "train")``: image scenes
  (two objects with probability ``two_object_fraction``) or videos of ``spec.frames`` frames; each caption is
  replaced by the empty caption with probability ``caption_dropout`` (classifier-free guidance);
- loss: flow matching (rectified flow): ``t = sigmoid(n)``, n ~ N(0, 1) (the logit-normal schedule of Esser et al.
  2024, §3.1), ``x_t = (1 − t)·x0 + t·noise``, mean squared error between the transformer's output at timestep
  ``1000·t`` and ``noise − x0``; pixels in [−1, 1];
- AdamW (betas 0.9, 0.99; weight decay on matrices only), linear warmup over ``warmup_steps`` then cosine to
  ``lr · min_lr_ratio``, gradients clipped to ``grad_clip``;
- at the end: ``out/checkpoint`` (the pipeline folder, written to a temporary folder and renamed into place),
  ``out/train_log.csv`` and ``out/results.json`` (settings, loss curve summary, seconds).

Noise and timesteps come from a ``torch.Generator`` seeded with ``seed``, so a run is a function of its config.
No resume: a run takes minutes. A non-empty ``out`` is refused unless ``force``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from attnlab.errors import ConfigError
from attnlab.params import Range, coerce_fields
from attnlab.progress import ProgressArg, progress_to

__all__ = ["RESULTS", "TRAIN_LOG", "DitTrainConfig", "draw_batch", "train_dit"]

RESULTS = "results.json"
TRAIN_LOG = "train_log.csv"
DEFAULT_STEPS = {"image": 600, "video": 500}
DEFAULT_BATCH = {"image": 64, "video": 16}
"""The defaults per kind: 600 updates of 64 images or 500 of 16 four-frame videos (about 0.3 s per update on two idle
CPU cores, so 3 minutes; 1 … 2 s per update on busy shared cores, so within the lab's 8 … 15 minutes)."""


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class DitTrainConfig:
    """Everything a DiT training run depends on (saved in ``results.json`` and the pipeline's ``lab_dit.json``).

    Attributes:
        kind: ``image`` (PixArt) | ``video`` (Wan). spec: :class:`attnlab.lab.dit.model.DitSpec` fields to change
            (``kind`` comes from here).
        steps, batch_size (None = :data:`DEFAULT_STEPS`, :data:`DEFAULT_BATCH` of the kind), lr, warmup_steps (None =
        50, or a tenth of a run shorter than 500 updates),
            min_lr_ratio, weight_decay, grad_clip: the optimisation.
        caption_dropout: probability of training on the empty caption. two_object_fraction: share of two-object
            image scenes. seed: initialisation, data, noise. device: where to train. out: output directory (None =
            write nothing).
    """

    kind: Literal["image", "video"] = "image"
    steps: Annotated[int, Range(ge=1)] | None = None
    batch_size: Annotated[int, Range(ge=1, le=4096)] | None = None
    lr: Annotated[float, Range(gt=0, le=1)] = 1e-3
    warmup_steps: Annotated[int, Range(ge=0)] | None = None
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    weight_decay: Annotated[float, Range(ge=0, le=10)] = 0.01
    grad_clip: Annotated[float, Range(gt=0)] = 1.0
    caption_dropout: Annotated[float, Range(ge=0, le=1)] = 0.1
    two_object_fraction: Annotated[float, Range(ge=0, le=1)] = 0.3
    seed: Annotated[int, Range(ge=0)] = 0
    spec: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    out: str | None = None

    def _spec_dict(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ConfigError(f"dit train: spec must map DitSpec fields to values, got {value!r}")
        return self.model_spec_of(value).to_dict()

    def __post_init__(self) -> None:
        coerce_fields(self, "dit train", {"spec": self._spec_dict, "out": _optional_text})
        if self.steps is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS[self.kind])
        if self.batch_size is None:
            object.__setattr__(self, "batch_size", DEFAULT_BATCH[self.kind])
        if self.warmup_steps is None:  # 50 updates, or a tenth of a short run
            object.__setattr__(self, "warmup_steps", min(50, self.steps // 10))
        if self.warmup_steps > self.steps:
            raise ConfigError(f"dit train: --warmup-steps {self.warmup_steps} exceeds --steps {self.steps}")

    def model_spec_of(self, values: dict[str, Any]) -> Any:
        from attnlab.lab.dit.model import DitSpec

        names = {f.name for f in dataclasses.fields(DitSpec)} - {"kind"}
        if values.get("kind", self.kind) != self.kind:
            raise ConfigError(f"dit train: spec kind={values['kind']!r} differs from kind={self.kind!r}")
        unknown = sorted(set(values) - names - {"kind"})
        if unknown:
            raise ConfigError(f"dit train: unknown spec fields {unknown}; expected some of {sorted(names)}")
        return DitSpec(**{**values, "kind": self.kind})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def learning_rate(config: DitTrainConfig, step: int) -> float:
    """The learning rate of update ``step`` (1-based): linear warmup, then cosine to ``lr · min_lr_ratio``."""
    if step <= config.warmup_steps:
        return config.lr * step / max(1, config.warmup_steps)
    span = max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * (step - config.warmup_steps) / span))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def draw_batch(config: DitTrainConfig, step: int) -> tuple[Any, list[tuple[str, ...]]]:
    """Batch ``step`` (0-based) of a run: ``(pixels, captions)``; pixels (batch, 3, 32, 32) or (batch, 3, frames,
    32, 32) float32 in [−1, 1], captions word tuples (``()`` = dropped to the empty caption)."""
    import numpy as np
    import torch

    from attnlab.lab.dit.scenes import draw_image_scene, draw_video
    from attnlab.lab.tasks.base import batch_rng

    rng = batch_rng(config.seed, step, "train", owner="dit train")
    frames = int(config.spec["frames"])
    images, captions = [], []
    for _ in range(config.batch_size):
        if config.kind == "image":
            drawn = draw_image_scene(rng, objects=2 if rng.random() < config.two_object_fraction else 1)
        else:
            drawn = draw_video(rng, frames=frames)
        images.append(drawn.image)
        captions.append(() if rng.random() < config.caption_dropout else drawn.caption)
    pixels = torch.from_numpy(np.stack(images)).float().div(127.5).sub(1)  # (B, [F,] H, W, 3)
    return pixels.movedim(-1, 1).contiguous(), captions  # (B, 3, [F,] H, W)


def check_out(config: DitTrainConfig, *, force: bool) -> None:
    """ConfigError when ``out`` exists and is not empty and ``force`` is not set."""
    if config.out is None:
        return
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"{out} is not empty; pass --force to overwrite its results and checkpoint")


def train_dit(config: DitTrainConfig, *, force: bool = False, progress: ProgressArg = None) -> dict[str, Any]:
    """Train and (with ``config.out``) write the pipeline folder and results; return the record ``{"kind":
    "dit_train", "config", "train": {"losses": [per update], "final_loss", "loss_first_50", "loss_last_50",
    "seconds", "num_parameters", "threads"}, "checkpoint", "pipeline"}`` (``pipeline``: the trained
    :class:`~attnlab.lab.dit.pipeline.LabPipeline` in eval mode; ``results.json`` holds the rest without the
    per-update losses, which go to ``train_log.csv``).

    Raises ConfigError for a non-empty ``out`` without ``force``."""
    check_out(config, force=force)
    with progress_to(progress, always=lambda message: not message.startswith("step ")) as notify:
        return _train(config, notify)


def _train(config: DitTrainConfig, notify: Any) -> dict[str, Any]:
    import torch

    from attnlab.lab.dit.model import tokenize
    from attnlab.lab.dit.pipeline import LabPipeline

    pipe = LabPipeline.build(config.model_spec_of(config.spec), seed=config.seed).to(config.device)
    pipe.lab["train"] = config.to_dict()
    modules = torch.nn.ModuleList([pipe.transformer, pipe.text]).train()
    matrices = [p for p in modules.parameters() if p.dim() >= 2]
    others = [p for p in modules.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": config.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.99))
    generator = torch.Generator().manual_seed(config.seed)
    count = sum(p.numel() for p in modules.parameters())
    losses: list[float] = []
    log: list[tuple[int, str, float]] = []
    notify(0, config.steps, f"training a {count:,}-parameter {config.kind} DiT on {config.device}")
    started = time.monotonic()
    for step in range(1, config.steps + 1):
        x0, captions = draw_batch(config, step - 1)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.sigmoid(torch.randn(len(x0), generator=generator))  # (B,) logit-normal
        t_b = t.view(-1, *([1] * (x0.dim() - 1)))
        x_t = ((1 - t_b) * x0 + t_b * noise).to(config.device)
        ids, keep = tokenize(captions, pipe.spec.max_words)
        hidden = pipe.text(ids.to(config.device))
        velocity = pipe.velocity(x_t, t.to(config.device), hidden, keep.to(config.device))
        loss = torch.nn.functional.mse_loss(velocity, (noise - x0).to(config.device))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(modules.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        log += [(step, "loss", losses[-1]), (step, "grad_norm", float(grad_norm)),
                (step, "lr", learning_rate(config, step))]
        notify(step, config.steps, f"step {step}/{config.steps}: loss {losses[-1]:.4f}")
    seconds = time.monotonic() - started
    pipe.eval()
    window = max(1, min(50, len(losses) // 2))  # the first and last updates, not overlapping on short runs
    train = {"final_loss": losses[-1], "loss_window": window, "loss_first_50": sum(losses[:window]) / window,
             "loss_last_50": sum(losses[-window:]) / window, "seconds": seconds, "num_parameters": count,
             "threads": torch.get_num_threads()}
    results = {"kind": "dit_train", "config": config.to_dict(), "train": train, "checkpoint": None}
    if config.out is not None:
        results["checkpoint"] = str(write_outputs(Path(config.out), pipe, log, results))
    notify(config.steps, config.steps, f"trained in {seconds:.0f} s: loss {train['loss_first_50']:.4f} (first "
                                       f"{window}) → {train['loss_last_50']:.4f} (last {window})")
    results["train"] = {**train, "losses": losses}
    results["pipeline"] = pipe
    return results


def write_outputs(out: Path, pipe: Any, log: list[tuple[int, str, float]], results: dict[str, Any]) -> Path:
    """``out/checkpoint`` (atomic), ``out/train_log.csv`` and ``out/results.json`` (atomic writes); returns the
    checkpoint path."""
    from attnlab.io_utils import atomic_write_text
    from attnlab.lab.checkpoint import CHECKPOINT, replace_dir
    from attnlab.lab.dit.pipeline import save_pipeline

    pipe.to("cpu")
    checkpoint = replace_dir(out, CHECKPOINT, lambda temp: save_pipeline(pipe, temp))
    lines = ["step,statistic,value", *(f"{s},{name},{value!r}" for s, name, value in log)]
    atomic_write_text(out / TRAIN_LOG, "\n".join(lines) + "\n")
    results = {**results, "checkpoint": str(checkpoint)}
    atomic_write_text(out / RESULTS, json.dumps(results, indent=1, allow_nan=True) + "\n")
    return checkpoint
