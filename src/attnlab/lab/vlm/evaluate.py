"""Evaluate the small VLM on a fixed seeded test set: accuracy per question kind and the hallucination rate.

- Test set (:func:`eval_items`): ``per_kind`` questions of each kind (presence, colour, count, position); question
  ``i`` of kind ``k`` comes from ``batch_rng(TEST_SEED, i, "eval")`` offset by the kind, drawing scenes until one
  allows the kind. It does not depend on the training seed, so every model and variant sees the same questions.
- Prediction: the argmax over the whole vocabulary of the logits at the last prompt token (``<bos> <image>×N
  question ?``); an answer is right when that word is exactly the answer.
- Hallucination rate: the share of ``yes`` on presence questions about absent objects (POPE-style adversarial
  absent objects, :mod:`attnlab.lab.vlm.questions`); ``yes_rate_present`` is the share of ``yes`` on present ones.
- Variants: ``edits`` (specs such as ``"temperature:tau=0.8"`` or Edit objects) run inside
  ``attnlab.Session(model, edits=edits)`` for every forward. A model trained with ``positions="cca"`` is always
  fed its CCA position ids and concentric mask (:func:`attnlab.lab.vlm.data.cca_inputs`), as it was trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from attnlab.errors import ConfigError
from attnlab.lab.tasks.base import batch_rng
from attnlab.lab.vlm.data import Item
from attnlab.lab.vlm.questions import KINDS, draw_question, possible_kinds
from attnlab.lab.vlm.scenes import draw_scene
from attnlab.progress import ProgressArg, progress_to

__all__ = ["TEST_SEED", "evaluate", "evaluate_dir", "evaluate_variants", "eval_items", "predict"]

TEST_SEED = 160_000_016
"""The test set's seed (fixed; independent of training seeds)."""


def eval_items(per_kind: int = 500, *, seed: int = TEST_SEED) -> list[Item]:
    """``per_kind`` (scene, question) pairs of each kind in :data:`KINDS` order (see the module doc)."""
    if per_kind < 1:
        raise ConfigError(f"expected per_kind >= 1, got {per_kind}")
    items: list[Item] = []
    for kind_index, kind in enumerate(KINDS):
        for index in range(per_kind):
            rng: np.random.Generator = batch_rng(seed, kind_index * 1_000_000 + index, "eval", owner="vlm test")
            scene = draw_scene(rng)
            while kind not in possible_kinds(scene):
                scene = draw_scene(rng)
            items.append((scene, draw_question(scene, rng, (kind,))))
    return items


def predict(model: Any, processor: Any, items: Sequence[Item], *, positions: str = "rope",
            edits: Sequence[Any] = (), batch_size: int = 100, progress: ProgressArg = None) -> list[str]:
    """The predicted answer word of each item (argmax at the last prompt token), in a Session with ``edits``
    when any are given; ``positions="cca"`` feeds CCA position ids and mask (the model must have been trained
    with them)."""
    import torch

    from attnlab.lab.vlm.data import cca_inputs, encode

    if positions not in ("rope", "cca"):
        raise ConfigError(f"expected positions 'rope' or 'cca', got {positions!r}")
    tokenizer = processor.tokenizer
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    words: list[str] = []
    with progress_to(progress) as notify, _session(model, edits), torch.no_grad():
        for begin in range(0, len(items), batch_size):
            chunk = items[begin:begin + batch_size]
            batch = encode(chunk, processor, answers=False)
            last = batch["attention_mask"].sum(dim=1) - 1  # (B,) the last prompt token (right padding)
            if positions == "cca":
                batch.update(cca_inputs(batch["input_ids"], batch["attention_mask"], model.config.image_token_id,
                                        grid))
            logits = model(**batch).logits  # (B, L, V)
            ids = logits[torch.arange(len(chunk)), last].argmax(dim=-1)
            words += tokenizer.convert_ids_to_tokens(ids.tolist())
            notify(min(begin + batch_size, len(items)), len(items), "answering test questions")
    return words


def _session(model: Any, edits: Sequence[Any]) -> Any:
    if not edits:
        return contextlib.nullcontext()
    from attnlab import Session

    return Session(model, edits=list(edits))


def evaluate(model: Any, processor: Any, lab: dict[str, Any], *, per_kind: int = 500, edits: Sequence[Any] = (),
             seed: int = TEST_SEED, progress: ProgressArg = None) -> dict[str, Any]:
    """Score ``model`` on :func:`eval_items` ``(per_kind, seed=seed)``.

    Returns ``{"accuracy", "per_kind": {kind: accuracy}, "hallucination_rate", "yes_rate_present",
    "num_questions", "positions", "edits": [spec strings]}`` (floats in [0, 1])."""
    items = eval_items(per_kind, seed=seed)
    positions = str(lab.get("positions", "rope"))
    words = predict(model, processor, items, positions=positions, edits=edits, progress=progress)
    right = [word == question.answer for word, (_, question) in zip(words, items)]
    per_kind_acc = {kind: _mean([r for r, (_, q) in zip(right, items) if q.kind == kind]) for kind in KINDS}
    absent = [w == "yes" for w, (_, q) in zip(words, items) if q.kind == "presence" and q.absent]
    present = [w == "yes" for w, (_, q) in zip(words, items) if q.kind == "presence" and not q.absent]
    return {"accuracy": _mean(right), "per_kind": per_kind_acc, "hallucination_rate": _mean(absent),
            "yes_rate_present": _mean(present), "num_questions": len(items), "num_absent": len(absent),
            "positions": positions, "edits": [_spec_text(e) for e in edits]}


def _mean(values: Sequence[bool]) -> float:
    return float(sum(values)) / len(values) if values else float("nan")


def _spec_text(edit: Any) -> str:
    if isinstance(edit, str):
        return edit
    if hasattr(edit, "spec"):  # the full spec (layers=, heads=, queries=, keys=), replayable by parse_edit_spec
        return edit.spec()
    params = ",".join(f"{k}={v}" for k, v in edit.params().items()) if hasattr(edit, "params") else ""
    return f"{getattr(edit, 'name', type(edit).__name__)}{':' + params if params else ''}"


def evaluate_dir(model_dir: str | Path, *, edits: Sequence[Any] = (), per_kind: int = 500,
                 progress: ProgressArg = None) -> dict[str, Any]:
    """:func:`evaluate` of a model directory written by ``attnlab vlm train`` (its ``checkpoint``, or the
    directory itself); raises ConfigError when it is not one."""
    from attnlab.lab.vlm.model import load_vlm

    path = model_path(model_dir)
    model, processor, lab = load_vlm(path)
    report = evaluate(model, processor, lab, per_kind=per_kind, edits=edits, progress=progress)
    return {**report, "model": str(path)}


def model_path(model_dir: str | Path) -> Path:
    """``DIR/checkpoint`` when ``DIR`` is a training's output directory, else ``DIR``."""
    from attnlab.lab.vlm.model import LAB_JSON

    path = Path(model_dir)
    if not (path / LAB_JSON).is_file() and (path / "checkpoint" / LAB_JSON).is_file():
        return path / "checkpoint"
    return path


def evaluate_variants(model_dir: str | Path, variants: dict[str, Sequence[Any]], *, per_kind: int = 500,
                      progress: ProgressArg = None) -> dict[str, Any]:
    """:func:`evaluate` of one model directory under each variant (name → edits; ``[]`` = unedited), the model
    loaded once. Returns ``{"model": path, "lab": vlm_lab.json, "per_kind": n, "variants": {name: report}}``."""
    from attnlab.lab.vlm.model import load_vlm

    path = model_path(model_dir)
    model, processor, lab = load_vlm(path)
    reports = {}
    with progress_to(progress) as notify:
        for index, (name, edits) in enumerate(variants.items()):
            notify(index, len(variants), f"variant {name}")
            reports[name] = evaluate(model, processor, lab, per_kind=per_kind, edits=edits)
        notify(len(variants), len(variants), "variants done")
    return {"model": str(path), "lab": lab, "per_kind": per_kind, "variants": reports}
