"""SoftPAG guidance and HeadHunter's objective on the DiT lab's image model.

    pipe = load_pipeline("runs/dit17/image")
    images = pipe.sample(captions, steps=20, guidance=3.0, seed=0,
                         predict=lab_predictor(pipe, heads=[(0, 1), (4, 3)], alpha=1.0, scale=2.0))
    objective = lab_objective(pipe, samples=32, steps=10, guidance=3.0, alpha=1.0, scale=2.0)
    found = headhunter(objective, perturbable_heads(pipe.transformer), rounds=3)

The guided velocity is ``v_null + s·(v_caption − v_null) + w·(v_caption − ṽ_caption)``
(:func:`attnlab.diffusion.guidance.cfg_perturbation_guidance`), s the sampler's ``guidance``, w ``scale`` and ṽ the
velocity with the chosen heads' attention blended toward the identity by α (SoftPAG, Ahn et al. 2025, §3;
METHODS.md #14). The objective: the lab classifier's ``accuracy`` (or another measure of
:func:`attnlab.lab.dit.evaluate.image_scores`) on images sampled for fixed test captions from fixed noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from attnlab.diffusion.guidance import softpag_predictor
from attnlab.diffusion.headhunter import GuidanceObjective
from attnlab.errors import ConfigError
from attnlab.lab.dit.pipeline import Condition, LabPipeline, Predict

__all__ = ["ONE_OBJECT_METRICS", "TWO_OBJECT_METRICS", "lab_objective", "lab_predictor"]

ONE_OBJECT_METRICS = ("accuracy", "colour_accuracy", "shape_accuracy", "colour_fidelity")  # image_scores keys
TWO_OBJECT_METRICS = ("two_object_accuracy", "two_object_recall")


def lab_predictor(pipe: LabPipeline, heads: Sequence[Sequence[int]], *, alpha: float = 1.0,
                  scale: float = 2.0) -> Predict:
    """A ``predict(x, t, cond)`` for :meth:`LabPipeline.sample`: CFG at the sampler's ``guidance`` plus SoftPAG
    guidance of strength ``scale`` on ``heads`` ((layer, head) pairs of self-attention layers) with blend ``alpha``.

    ``heads=[]``, ``scale=0`` or ``alpha=0`` give exactly the lab's :meth:`LabPipeline.cfg_velocity`.
    Raises ConfigError (one line) for unknown or cross-attention heads, alpha outside [0, 1], a scale not finite.
    """
    def forward(x: Tensor, t: Any, branch: tuple[Tensor, Tensor]) -> Tensor:
        return pipe.velocity(x, t, *branch)

    softpag_predictor(pipe.transformer, heads, alpha=alpha, scale=scale, forward=forward)  # refuses bad input now

    def predict(x: Tensor, t: float, cond: Condition) -> Tensor:
        guided = softpag_predictor(pipe.transformer, heads, alpha=alpha, scale=scale, cfg_scale=cond.guidance,
                                   forward=forward, null_cond=(cond.null_hidden, cond.null_keep))
        return guided(x, t, (cond.hidden, cond.keep))

    return predict


def lab_objective(pipe: LabPipeline, *, samples: int = 32, steps: int = 10, guidance: float = 3.0, seed: int = 0,
                  alpha: float = 1.0, scale: float = 2.0, metric: str = "accuracy",
                  scene_seed: int | None = None) -> GuidanceObjective:
    """HeadHunter's objective on the lab: ``image_scores(...)[metric]`` of images sampled with :func:`lab_predictor`.

    Every call samples the same captions (the ``samples`` one-object test scenes for a one-object metric, the
    ``samples`` two-object ones for a two-object metric; :func:`attnlab.lab.dit.evaluate.eval_scenes` with
    ``scene_seed``, default the lab's test seed) from the same noise (``seed``) in one batch, so head sets are
    compared on equal draws.

    Args:
        pipe: the lab's image pipeline. samples: scenes sampled per call (≥ 1). steps, guidance: the sampler's.
        alpha, scale: SoftPAG's α and w. metric: a key of ``image_scores`` (``accuracy``: one-object samples
            whose top class is the caption's colour and shape; ``two_object_accuracy``; ``colour_fidelity``, …).

    Raises:
        ConfigError: a video pipeline, an unknown metric, or bad values (as :func:`lab_predictor`, ``eval_scenes``).
    """
    from attnlab.lab.dit.evaluate import TEST_SEED, image_scores, eval_scenes

    if pipe.kind != "image":
        raise ConfigError(f"lab_objective scores images; got a {pipe.kind} pipeline")
    if metric not in ONE_OBJECT_METRICS + TWO_OBJECT_METRICS:
        raise ConfigError(f"metric must be one of {', '.join(ONE_OBJECT_METRICS + TWO_OBJECT_METRICS)}; "
                          f"got {metric!r}")
    items = eval_scenes("image", samples, seed=TEST_SEED if scene_seed is None else scene_seed)
    items = items[:samples] if metric in ONE_OBJECT_METRICS else items[samples:]  # only the scenes it reads
    captions = [" ".join(item.caption) for item in items]
    lab_predictor(pipe, [], alpha=alpha, scale=scale)  # refuses bad options now

    def sample(predict: Predict) -> Tensor:
        return pipe.sample(captions, steps=steps, guidance=guidance, seed=seed, predict=predict)

    def score(images: Tensor) -> float:
        return image_scores(images, items)[metric]

    return GuidanceObjective(pipe.transformer, lambda heads: lab_predictor(pipe, heads, alpha=alpha, scale=scale),
                             sample, score)
