"""Evaluate a lab DiT: does a sample show what its caption says, and does a video move in a straight line?

The measures (fixed before any reference run; docs/dit_lab.md):

- Test captions (:func:`eval_scenes`): ``samples`` one-object and ``samples`` two-object image scenes, or
  ``samples`` videos, item ``i`` from ``batch_rng(TEST_SEED, i, "eval")``; they do not depend on the training seed.
  The same measures on these real scenes are reported with the prefix ``real_`` (the ceiling).
- Classifier (:func:`train_classifier`): a small CNN trained here on rendered scenes (one- and two-object images
  and video frames, with pixel noise), 12 sigmoid outputs = "a (colour, shape) object is present". One-object
  samples: ``colour_accuracy``, ``shape_accuracy``, ``accuracy`` (both right) of the top output against the
  caption. Two-object samples: ``two_object_accuracy`` (the top two outputs are exactly the caption's two objects)
  and ``two_object_recall`` (the share of the caption's objects among the top two).
- Foreground (:func:`foreground_masks`): a pixel is foreground when ``255 − min(R, G, B) > 96`` (white is 0, every
  palette colour ≥ 215). ``colour_fidelity`` (:func:`colour_fidelity`): the share of foreground pixels whose
  nearest palette colour is the caption's; ``colour_error``: their mean RGB distance to the caption colour / (255
  √3); ``background_error``: the mean ``1 − min(R, G, B)/255`` of the other pixels; ``foreground_area``: the
  foreground share of the image. One-object images only; real scenes use their true masks.
- Video (sampled at the trained frames F and at 2F): ``frame_accuracy`` (per frame, both colour and shape right) at
  F; at 2F ``frame_accuracy_trained`` (frames < F) and ``frame_accuracy_beyond`` (frames ≥ F). Motion
  (:func:`track_stats`): the centroid of each frame's foreground, a least-squares straight line ``c0 + v·f`` through
  them; ``track_rmse`` (px, RMS distance from the line; a constant-velocity straight track gives ≈ 0 up to
  rasterisation), ``direction_accuracy`` (the larger component of ``v`` has the caption's axis and sign),
  ``speed`` (|v|, px per frame; real 0.75 … 1.25), ``track_found`` (share of frames with a foreground), each with
  the suffix ``_f{F}`` or ``_f{2F}``.

Every function returns plain floats, so a report is one pandas row.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.lab.dit.scenes import COLOURS, DIRECTIONS, SHAPES, Drawn
from attnlab.progress import ProgressArg, progress_to

__all__ = ["FOREGROUND_THRESHOLD", "TEST_SEED", "ShapeClassifier", "colour_fidelity", "evaluate_pipeline",
           "foreground_masks", "eval_scenes", "track_stats", "train_classifier"]

TEST_SEED = 170_000_017
"""The test captions' seed (fixed; independent of training seeds)."""
FOREGROUND_THRESHOLD = 96
"""A pixel is foreground when ``255 − min(R, G, B)`` exceeds this."""
COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
"""The classifier's outputs: (colour, shape), colour-major."""
_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255  # (4, 3)


class ShapeClassifier(nn.Module):
    """Three 3 × 3 conv layers (16, 32, 32 channels, ReLU, 2 × 2 max-pooling after the first two), global max
    pooling, a linear layer to the 12 :data:`COMBOS` logits. ``forward``: (batch, 3, 32, 32) in [0, 1] →
    (batch, 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1))
        self.head = nn.Linear(32, len(COMBOS))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images * 2 - 1).flatten(1))  # (B, 12)


def _targets(objects: Sequence[Any]) -> list[int]:
    return [COMBOS.index((o.colour, o.shape)) for o in objects]


@functools.lru_cache(maxsize=2)
def train_classifier(seed: int = 0, steps: int = 800, batch_size: int = 64) -> ShapeClassifier:
    """Train :class:`ShapeClassifier` (seeded) on freshly drawn scenes: per item a one-object image, a two-object
    image or a random frame of a video (1/3 each), plus Gaussian pixel noise of std U(0, 0.1); binary
    cross-entropy on the 12 presence targets; Adam, lr 2e-3. Under a minute on two CPU cores; cached per arguments.
    Returns the model in eval mode on the CPU."""
    from attnlab.lab.dit.scenes import draw_image_scene, draw_video
    from attnlab.lab.tasks.base import batch_rng

    torch.manual_seed(seed)
    model = ShapeClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rng = batch_rng(seed, step, "train", owner="dit classifier")
        images, targets = [], torch.zeros(batch_size, len(COMBOS))
        for row in range(batch_size):
            pick = rng.random()
            if pick < 2 / 3:
                drawn = draw_image_scene(rng, objects=1 if pick < 1 / 3 else 2)
                image = drawn.image
            else:
                drawn = draw_video(rng, frames=8)
                image = drawn.image[int(rng.integers(8))]
            images.append(image)
            targets[row, _targets(drawn.objects)] = 1
        x = _as_tensor(np.stack(images))
        x = x + torch.rand(batch_size, 1, 1, 1, generator=generator) * 0.1 * torch.randn(x.shape, generator=generator)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def _as_tensor(images: np.ndarray) -> Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(images).float().div(255).movedim(-1, 1).contiguous()


def classify(images: Tensor, *, seed: int = 0) -> Tensor:
    """The classifier's logits of (N, 3, 32, 32) images in [0, 1]: (N, 12) float32."""
    model = train_classifier(seed)  # outside no_grad: the first call trains it
    with torch.no_grad():
        return model(images)


def eval_scenes(kind: str, samples: int, *, frames: int = 8, seed: int = TEST_SEED) -> list[Drawn]:
    """The fixed test items: ``samples`` one-object then ``samples`` two-object scenes (``kind="image"``), or
    ``samples`` videos of ``frames`` frames. Raises ConfigError for samples < 1 or an unknown kind."""
    from attnlab.lab.dit.scenes import draw_image_scene, draw_video
    from attnlab.lab.tasks.base import batch_rng

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"expected samples >= 1, got {samples!r}")
    if kind not in ("image", "video"):
        raise ConfigError(f"expected kind 'image' or 'video', got {kind!r}")
    items = []
    for index in range(samples if kind == "video" else 2 * samples):
        rng = batch_rng(seed, index, "eval", owner="dit test")
        items.append(draw_video(rng, frames=frames) if kind == "video"
                     else draw_image_scene(rng, objects=1 if index < samples else 2))
    return items


def foreground_masks(images: Tensor) -> Tensor:
    """(..., 3, H, W) in [0, 1] → (..., H, W) bool: ``255 − min(R, G, B) > FOREGROUND_THRESHOLD``."""
    return (1 - images.min(dim=-3).values) * 255 > FOREGROUND_THRESHOLD


def colour_fidelity(images: Tensor, masks: Tensor, colours: Sequence[str]) -> dict[str, float]:
    """Foreground-colour fidelity of (N, 3, H, W) images in [0, 1] with (N, H, W) bool foreground masks against
    each image's caption colour (see the module doc). Means over images with a non-empty mask (NaN if none).

    Returns ``{"colour_fidelity", "colour_error", "background_error", "foreground_area"}``."""
    if images.shape[0] != masks.shape[0] or len(colours) != images.shape[0]:
        raise ConfigError(f"expected one mask and one colour per image, got {images.shape[0]} images, "
                          f"{masks.shape[0]} masks, {len(colours)} colours")
    pixels = images.movedim(1, -1)  # (N, H, W, 3)
    nearest = torch.cdist(pixels.reshape(-1, 3), _PALETTE).argmin(dim=-1).view(masks.shape)  # (N, H, W)
    fidelity, error, background = [], [], []
    names = list(COLOURS)
    for row, colour in enumerate(colours):
        mask = masks[row]
        background.append(float((1 - pixels[row][~mask].min(dim=-1).values).mean()) if (~mask).any() else 0.0)
        if mask.any():
            fidelity.append(float((nearest[row][mask] == names.index(colour)).float().mean()))
            target = _PALETTE[names.index(colour)]
            error.append(float((pixels[row][mask] - target).norm(dim=-1).mean() / 3 ** 0.5))
    return {"colour_fidelity": _mean(fidelity), "colour_error": _mean(error), "background_error": _mean(background),
            "foreground_area": float(masks.float().mean())}


def track_stats(masks: Tensor, directions: Sequence[str], *, frames: slice | None = None) -> dict[str, float]:
    """Motion of (N, F, H, W) bool foreground masks against caption directions: see the module doc. A video with
    fewer than 3 frames with a foreground counts as wrong direction and is left out of ``track_rmse``/``speed``.
    ``frames``: a slice of frames to use (default all)."""
    masks = masks[:, frames] if frames is not None else masks
    size = masks.shape[-1]
    coords = torch.arange(size, dtype=torch.float32)
    rmse, speed, right = [], [], []
    found = masks.flatten(2).any(dim=-1)  # (N, F)
    for row, direction in enumerate(directions):
        present = found[row].nonzero().flatten()
        if len(present) < 3:
            right.append(False)
            continue
        weights = masks[row, present].float()  # (P, H, W)
        total = weights.sum(dim=(1, 2))
        centre = torch.stack([(weights.sum(dim=1) * coords).sum(dim=1) / total,  # x
                              (weights.sum(dim=2) * coords).sum(dim=1) / total], dim=1)  # y; (P, 2)
        design = torch.stack([torch.ones(len(present)), present.float()], dim=1)  # (P, 2)
        solution = torch.linalg.lstsq(design, centre).solution  # (2, 2): [c0; v]
        residual = centre - design @ solution
        rmse.append(float(residual.pow(2).sum(dim=1).mean().sqrt()))
        velocity = solution[1]
        speed.append(float(velocity.norm()))
        axis = int(velocity.abs().argmax())
        ux, uy = DIRECTIONS[direction]
        expected_axis, expected_sign = (0, ux) if ux else (1, uy)
        right.append(axis == expected_axis and float(velocity[axis]) * expected_sign > 0)
    return {"track_rmse": _mean(rmse), "direction_accuracy": _mean([float(r) for r in right]),
            "speed": _mean(speed), "track_found": float(found.float().mean())}


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _caption_combos(drawn: Drawn) -> list[int]:
    return _targets(drawn.objects)


def image_scores(images: Tensor, items: Sequence[Drawn], masks: Tensor | None = None) -> dict[str, float]:
    """The image measures of the module doc for (2n, 3, 32, 32) images in [0, 1] drawn for ``items`` (n one-object
    then n two-object :func:`eval_scenes`); ``masks`` (2n, 32, 32) bool foreground (default
    :func:`foreground_masks`)."""
    logits = classify(images)
    single = [i for i, d in enumerate(items) if len(d.objects) == 1]
    double = [i for i, d in enumerate(items) if len(d.objects) == 2]
    top = logits.argmax(dim=-1)
    colour_right = [COMBOS[int(top[i])][0] == items[i].objects[0].colour for i in single]
    shape_right = [COMBOS[int(top[i])][1] == items[i].objects[0].shape for i in single]
    top2 = logits.topk(2, dim=-1).indices
    recall = [len(set(top2[i].tolist()) & set(_caption_combos(items[i]))) / 2 for i in double]
    masks = foreground_masks(images) if masks is None else masks
    fidelity = colour_fidelity(images[single], masks[single], [items[i].objects[0].colour for i in single])
    return {"colour_accuracy": _mean(colour_right), "shape_accuracy": _mean(shape_right),
            "accuracy": _mean([c and s for c, s in zip(colour_right, shape_right)]),
            "two_object_accuracy": _mean([r == 1 for r in recall]), "two_object_recall": _mean(recall), **fidelity}


def video_scores(videos: Tensor, items: Sequence[Drawn], trained: int, masks: Tensor | None = None
                 ) -> dict[str, float]:
    """The video measures of the module doc for (n, 3, F, 32, 32) videos in [0, 1] drawn for ``items``;
    ``trained``: the frames the model was trained on (frames ≥ it count as ``beyond``); ``masks`` (n, F, 32, 32)
    bool (default :func:`foreground_masks`)."""
    count, frames = videos.shape[0], videos.shape[2]
    per_frame = videos.movedim(2, 1).reshape(count * frames, *videos.shape[1:2], *videos.shape[3:])
    top = classify(per_frame).argmax(dim=-1).view(count, frames)  # (n, F)
    target = torch.tensor([_caption_combos(d)[0] for d in items])[:, None]
    right = (top == target).float()  # (n, F)
    masks = foreground_masks(videos.movedim(2, 1)) if masks is None else masks  # (n, F, H, W)
    directions = [d.caption[-1] for d in items]
    suffix = f"_f{frames}"
    scores = {f"{name}{suffix}": value for name, value in track_stats(masks, directions).items()}
    if frames <= trained:
        scores[f"frame_accuracy{suffix}"] = float(right.mean())
    else:
        scores[f"frame_accuracy_trained{suffix}"] = float(right[:, :trained].mean())
        scores[f"frame_accuracy_beyond{suffix}"] = float(right[:, trained:].mean())
    return scores


def evaluate_pipeline(pipe: Any, *, samples: int = 100, steps: int = 20, guidance: float = 3.0, seed: int = 0,
                      predict: Any = None, batch_size: int = 50, progress: ProgressArg = None) -> dict[str, Any]:
    """Sample the test captions with ``pipe`` (a :class:`~attnlab.lab.dit.pipeline.LabPipeline`; ``predict`` as in
    its ``sample``; chunk ``k`` of ``batch_size`` captions uses noise seed ``seed + k``) and score them; the same
    measures on the real test items with the prefix ``real_``. Returns one flat dict of settings and floats."""
    started = time.monotonic()
    trained = int(pipe.spec.frames)
    runs = [None] if pipe.kind == "image" else [trained, 2 * trained]
    items = eval_scenes(pipe.kind, samples, frames=max(runs) if pipe.kind == "video" else 8)
    report: dict[str, Any] = {"kind": pipe.kind, "samples": samples, "steps": steps, "guidance": float(guidance),
                              "seed": seed}
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with progress_to(progress) as notify:
        for run_index, frames in enumerate(runs):
            outputs = []
            for k, chunk in enumerate(chunks):
                done = run_index * len(chunks) + k
                notify(done, len(runs) * len(chunks), f"sampling {pipe.kind}s: chunk {done + 1}/"
                                                      f"{len(runs) * len(chunks)}")
                outputs.append(pipe.sample([" ".join(d.caption) for d in chunk], steps=steps, guidance=guidance,
                                           seed=seed + k, frames=frames, predict=predict))
            generated = torch.cat(outputs)
            if pipe.kind == "image":
                report.update(image_scores(generated, items))
            else:
                report.update(video_scores(generated, items, trained))
        notify(len(runs) * len(chunks), len(runs) * len(chunks), "scoring the real test items")
    report.update({f"real_{k}": v for k, v in real_scores(pipe.kind, items, runs, trained).items()})
    report["seconds"] = time.monotonic() - started
    return report


def real_scores(kind: str, items: Sequence[Drawn], runs: Sequence[int | None], trained: int) -> dict[str, float]:
    """The measures of the real test items themselves (true masks)."""
    if kind == "image":
        images = _as_tensor(np.stack([d.image for d in items]))
        masks = torch.from_numpy(np.stack([d.masks.any(axis=0) for d in items]))
        return image_scores(images, items, masks)
    scores: dict[str, float] = {}
    for frames in runs:
        videos = _as_tensor(np.stack([d.image[:frames] for d in items]).reshape(-1, *items[0].image.shape[1:]))
        videos = videos.view(len(items), frames, *videos.shape[1:]).movedim(1, 2)  # (n, 3, F, H, W)
        masks = torch.from_numpy(np.stack([d.masks[0, :frames] for d in items]))
        scores.update(video_scores(videos, items, trained, masks))
    return scores
