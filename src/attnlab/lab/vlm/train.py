"""Train the small VLM on synthetic scene questions: ``attnlab vlm train --out DIR``.

    from attnlab.lab.vlm.train import VlmTrainConfig, train_vlm
    result = train_vlm(VlmTrainConfig(out="runs/vlm"), progress=True)
    result["eval"]["accuracy"]          # overall accuracy on the fixed test set

What one run does:

- model: :func:`attnlab.lab.vlm.model.build_model` of ``spec`` (seeded with ``seed``); everything trains (vision
  tower, projector, language model) from scratch;
- data: update ``s`` (1-based) trains on :func:`attnlab.lab.vlm.data.draw_groups` ``(seed, s - 1, batch_size,
  questions_per_image)``: ``batch_size`` new scenes, each followed by ``questions_per_image`` distinct questions
  and their answers in one sequence (question kinds uniform among those the scene allows); several answers per
  image make each forward of the vision tower count several times (the test prompts hold one question);
- loss: cross-entropy on the answer words only (labels -100 elsewhere); AdamW (betas 0.9, 0.95; weight decay on
  matrices only), linear warmup over ``warmup_steps`` then cosine to ``lr · min_lr_ratio``, gradients clipped to
  ``grad_clip``;
- ``positions="cca"``: every forward gets CCA's ring position ids and concentric causal mask
  (:func:`attnlab.lab.vlm.data.cca_inputs`; Xing et al. 2024 §3, METHODS.md #11), so the model is trained in the
  CCA layout as the paper retrains LLaVA; ``"rope"`` is the plain raster layout;
- at the end: the fixed test set (:func:`attnlab.lab.vlm.evaluate.evaluate`), then ``out/checkpoint`` (a loadable
  model directory, written through a temporary directory and renamed into place), ``out/train_log.csv`` and
  ``out/results.json`` (settings, loss curve summary, accuracy per question kind, hallucination rate, seconds).

No resume: a run takes minutes. A non-empty ``--out`` is refused unless ``force``.
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

__all__ = ["RESULTS", "TRAIN_LOG", "VlmTrainConfig", "train_vlm"]

RESULTS = "results.json"
TRAIN_LOG = "train_log.csv"


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class VlmTrainConfig:
    """Everything a VLM training run depends on (saved in ``results.json`` and the model's ``vlm_lab.json``).

    Attributes:
        steps, batch_size, lr, warmup_steps, min_lr_ratio, weight_decay, grad_clip: the optimisation.
        positions: ``rope`` (raster order) | ``cca`` (concentric ids and mask, METHODS.md #11).
        questions_per_image: question–answer pairs per training sequence.
        seed: initialisation and training data. spec: :class:`attnlab.lab.vlm.model.VlmSpec` fields to change.
        eval_per_kind: test questions per kind at the end (the fixed test set). out: output directory (None =
            write nothing).
    """

    steps: Annotated[int, Range(ge=1)] = 2500
    batch_size: Annotated[int, Range(ge=1, le=4096)] = 32
    lr: Annotated[float, Range(gt=0, le=1)] = 2e-3
    warmup_steps: Annotated[int, Range(ge=0)] = 100
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    weight_decay: Annotated[float, Range(ge=0, le=10)] = 0.05
    grad_clip: Annotated[float, Range(gt=0)] = 1.0
    positions: Literal["rope", "cca"] = "rope"
    questions_per_image: Annotated[int, Range(ge=1, le=16)] = 4
    seed: Annotated[int, Range(ge=0)] = 0
    spec: dict[str, Any] = field(default_factory=dict)
    eval_per_kind: Annotated[int, Range(ge=1, le=100000)] = 500
    out: str | None = None

    def _spec_dict(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ConfigError(f"vlm train: spec must map VlmSpec fields to values, got {value!r}")
        return self.model_spec_of(value).to_dict()

    def __post_init__(self) -> None:
        coerce_fields(self, "vlm train", {"spec": self._spec_dict, "out": _optional_text})
        if self.warmup_steps > self.steps:
            raise ConfigError(f"vlm train: warmup_steps={self.warmup_steps} exceeds steps={self.steps}")

    @staticmethod
    def model_spec_of(values: dict[str, Any]) -> Any:
        from attnlab.lab.vlm.model import VlmSpec

        names = {f.name for f in dataclasses.fields(VlmSpec)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"vlm train: unknown spec fields {unknown}; expected some of {sorted(names)}")
        return VlmSpec(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def learning_rate(config: VlmTrainConfig, step: int) -> float:
    """The learning rate of update ``step`` (1-based): linear warmup, then cosine to ``lr · min_lr_ratio``."""
    if step <= config.warmup_steps:
        return config.lr * step / max(1, config.warmup_steps)
    span = max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * (step - config.warmup_steps) / span))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def check_out(config: VlmTrainConfig, *, force: bool) -> None:
    """ConfigError when ``out`` exists and is not empty and ``force`` is not set."""
    if config.out is None:
        return
    out = Path(config.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"{out} is not empty; pass --force to overwrite its results and checkpoint")


def train_vlm(config: VlmTrainConfig, *, force: bool = False, progress: ProgressArg = None) -> dict[str, Any]:
    """Train, evaluate and (with ``config.out``) write the model directory and results; return the results dict
    (``config``, ``train`` {final_loss, loss_first_50, loss_last_50, seconds, num_parameters}, ``eval``
    (see :func:`attnlab.lab.vlm.evaluate.evaluate`), ``checkpoint``).

    Raises ConfigError for a non-empty ``out`` without ``force``."""
    check_out(config, force=force)
    with progress_to(progress, always=lambda message: not message.startswith("step ")) as notify:
        return _train(config, notify)


def _train(config: VlmTrainConfig, notify: Any) -> dict[str, Any]:
    import torch

    from attnlab.lab.vlm.data import cca_inputs, draw_groups, encode_groups
    from attnlab.lab.vlm.evaluate import evaluate
    from attnlab.lab.vlm.model import VlmSpec, build_model, build_processor, build_tokenizer

    spec = VlmSpec(**config.spec)
    tokenizer = build_tokenizer()
    processor = build_processor(spec, tokenizer)
    model = build_model(spec, tokenizer, seed=config.seed)
    model.train()
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": config.weight_decay},
                                   {"params": others, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    image_token_id = model.config.image_token_id
    log: list[tuple[int, str, str, float]] = []
    started = time.monotonic()
    notify(0, config.steps, f"training a {sum(p.numel() for p in model.parameters()):,}-parameter VLM "
                            f"({config.positions} positions)")
    for step in range(1, config.steps + 1):
        groups = draw_groups(config.seed, step - 1, config.batch_size, config.questions_per_image)
        batch = encode_groups(groups, processor)
        if config.positions == "cca":
            batch.update(cca_inputs(batch["input_ids"], batch["attention_mask"], image_token_id, spec.grid))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        log += [(step, "train", "loss", loss.item()), (step, "train", "grad_norm", float(grad_norm)),
                (step, "train", "lr", learning_rate(config, step))]
        notify(step, config.steps, f"step {step}/{config.steps}: loss {log[-3][3]:.4f}")
    seconds = time.monotonic() - started
    model.eval()
    notify(config.steps, config.steps, f"evaluating on {4 * config.eval_per_kind} test questions")
    lab = {"spec": spec.to_dict(), "positions": config.positions, "train": config.to_dict()}
    report = evaluate(model, processor, lab, per_kind=config.eval_per_kind)
    losses = [value for _, _, name, value in log if name == "loss"]
    results = {"kind": "vlm_train", "config": config.to_dict(),
               "train": {"final_loss": losses[-1], "loss_first_50": sum(losses[:50]) / len(losses[:50]),
                         "loss_last_50": sum(losses[-50:]) / len(losses[-50:]), "seconds": seconds,
                         "num_parameters": sum(p.numel() for p in model.parameters()),
                         "threads": torch.get_num_threads()},
               "eval": report, "checkpoint": None}
    if config.out is not None:
        results["checkpoint"] = str(write_outputs(Path(config.out), model, processor, lab, log, results))
    notify(config.steps, config.steps, f"eval accuracy {100 * report['accuracy']:.1f} %, hallucination rate "
                                       f"{100 * report['hallucination_rate']:.1f} %")
    return results


def write_outputs(out: Path, model: Any, processor: Any, lab: dict[str, Any],
                  log: list[tuple[int, str, str, float]], results: dict[str, Any]) -> Path:
    """``out/checkpoint`` (atomic), ``out/train_log.csv`` and ``out/results.json`` (atomic writes); returns the
    checkpoint path."""
    from attnlab.io_utils import atomic_write_text
    from attnlab.lab.checkpoint import CHECKPOINT, replace_dir
    from attnlab.lab.vlm.model import save_model_dir

    checkpoint = replace_dir(out, CHECKPOINT, lambda temp: save_model_dir(temp, model, processor, lab))
    lines = ["step,split,statistic,value", *(f"{s},{split},{name},{value!r}" for s, split, name, value in log)]
    atomic_write_text(out / TRAIN_LOG, "\n".join(lines) + "\n")
    results = {**results, "checkpoint": str(checkpoint)}
    atomic_write_text(out / RESULTS, json.dumps(results, indent=1, allow_nan=True) + "\n")
    return checkpoint
