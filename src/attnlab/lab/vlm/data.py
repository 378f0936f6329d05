"""Batches of (scene, question) pairs for the small VLM: drawing, encoding through the processor, CCA inputs.

Shape legend: ``B`` items per batch, ``L`` tokens per sequence (right-padded), ``N = G·G`` image tokens per image
(``G`` patches per side), ``H = W`` image side in pixels.

- :func:`draw_items`: batch ``step`` of a split is a pure function of ``(seed, split, step, size)``: its generator is
  :func:`attnlab.lab.tasks.base.batch_rng` (``default_rng(SeedSequence([seed, split_id, step]))``).
- :func:`encode`: the LlavaProcessor turns each item into ``<bos> <image>×N question-words ?`` (+ the answer word
  when ``answers=True``); labels are -100 everywhere but at the position that predicts the answer word (aligned to
  the input, as transformers' causal-LM loss shifts them: ``labels[b, t]`` is the token at ``t``).
- :func:`cca_inputs`: the CCA layout (Xing et al. 2024, §3; METHODS.md #11): ring position ids for the image
  tokens, text continuing at ``start + num_rings``, and the concentric causal mask inside the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attnlab.errors import ShapeError
from attnlab.lab.tasks.base import IGNORE, Split, batch_rng
from attnlab.lab.vlm.questions import Question, draw_question
from attnlab.lab.vlm.scenes import Scene, draw_scene

__all__ = ["Group", "Item", "cca_inputs", "draw_groups", "draw_items", "encode", "encode_groups", "rings"]

Item = tuple[Scene, Question]
Group = tuple[Scene, tuple[Question, ...]]


def draw_items(seed: int, step: int, size: int, *, split: Split = "train",
               kinds: Sequence[str] | None = None) -> list[Item]:
    """``size`` (scene, question) pairs of batch ``step`` of ``split`` (a new scene per question)."""
    rng = batch_rng(seed, step, split, owner="vlm")
    items = []
    for _ in range(size):
        scene = draw_scene(rng)
        items.append((scene, draw_question(scene, rng, kinds)))
    return items


def draw_groups(seed: int, step: int, size: int, questions: int, *, split: Split = "train") -> list[Group]:
    """``size`` scenes of batch ``step`` of ``split``, each with ``questions`` distinct questions (fewer when the
    scene allows fewer distinct ones within 20 draws per question)."""
    rng = batch_rng(seed, step, split, owner="vlm")
    groups = []
    for _ in range(size):
        scene = draw_scene(rng)
        asked: dict[str, Question] = {}
        for _ in range(20 * questions):
            question = draw_question(scene, rng)
            asked.setdefault(question.text, question)
            if len(asked) == questions:
                break
        groups.append((scene, tuple(asked.values())))
    return groups


def encode_groups(groups: Sequence[Group], processor: Any) -> dict[str, Tensor]:
    """Training inputs with several question–answer pairs per image: ``<bos> <image>×N q1 ? a1 q2 ? a2 …``
    (right-padded); ``labels`` (B, L) int64 are -100 but at each answer word, so one forward scores every answer
    (each question sees the image and the earlier pairs). Keys as :func:`encode` with ``answers=True``.

    Relies on the word-level tokenizer (one token per word), checked: ShapeError if the token count differs."""
    texts = ["<image> " + " ".join(f"{q.text} {q.answer}" for q in questions) for _, questions in groups]
    batch = processor(images=[scene.image() for scene, _ in groups], text=texts, padding=True, return_tensors="pt")
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    image_tokens = int((input_ids[0] == processor.image_token_id).sum())
    labels = torch.full_like(input_ids, IGNORE)
    for row, (_, questions) in enumerate(groups):
        column = 1 + image_tokens  # after <bos> and the image
        if int(mask[row].sum()) != column + sum(len(q.text.split()) + 1 for q in questions):
            raise ShapeError("encode_groups expects one token per word (the lab's word-level tokenizer)")
        for question in questions:
            column += len(question.text.split())
            labels[row, column] = input_ids[row, column]
            column += 1
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": batch["pixel_values"],
            "labels": labels}


def encode(items: Sequence[Item], processor: Any, *, answers: bool) -> dict[str, Tensor]:
    """Model inputs for ``items``: ``input_ids``/``attention_mask`` (B, L) int64 right-padded, ``pixel_values``
    (B, 3, H, W) float32, and with ``answers`` the answer word appended and ``labels`` (B, L) int64 (-100 but at
    each answer word). Without answers the answer is predicted from the last real position of each row."""
    texts = [f"<image> {q.text}" + (f" {q.answer}" if answers else "") for _, q in items]
    batch = processor(images=[scene.image() for scene, _ in items], text=texts, padding=True, return_tensors="pt")
    out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
           "pixel_values": batch["pixel_values"]}
    if answers:
        last = batch["attention_mask"].sum(dim=1) - 1  # (B,) the answer word's column
        labels = torch.full_like(batch["input_ids"], IGNORE)
        rows = torch.arange(len(items))
        labels[rows, last] = batch["input_ids"][rows, last]
        out["labels"] = labels
    return out


def rings(grid: int) -> Tensor:
    """(grid·grid,) long: the ring of each token of a ``grid × grid`` raster, 0 = outermost (METHODS.md #11)."""
    index = torch.arange(grid)
    row, col = index[:, None], index[None, :]
    return torch.minimum(torch.minimum(row, col), torch.minimum(grid - 1 - row, grid - 1 - col)).reshape(-1)


def cca_inputs(input_ids: Tensor, attention_mask: Tensor, image_token_id: int, grid: int) -> dict[str, Tensor]:
    """CCA position ids and mask for right-padded rows holding one image of ``grid × grid`` tokens each.

    Args:
        input_ids: (B, L) long; each row has exactly one run of ``grid²`` image tokens. attention_mask: (B, L)
            0/1, right padding.
        image_token_id: the ``<image>`` id. grid: patches per side.

    Returns:
        ``position_ids`` (B, L) long: tokens before the image count 0, 1, …; image token (r, c) gets
        ``start + ring(r, c)``; the k-th token after the image gets ``start + num_rings + k``.
        ``attention_mask`` (B, 1, L, L) bool, True = attend: causal and key not padding, except that inside the
        image a token of ring p sees every image token of ring ≤ p (its own ring in both directions; Xing et al.
        2024 §3, METHODS.md #11).

    Raises ShapeError when a row does not hold exactly one contiguous run of ``grid²`` image tokens.
    """
    batch, length = input_ids.shape
    span = grid * grid
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    starts = is_image.float().argmax(dim=1)  # first image column per row
    if bool((counts != span).any()) or any(not bool(is_image[b, int(s):int(s) + span].all())
                                           for b, s in enumerate(starts)):
        raise ShapeError(f"cca_inputs: expected one contiguous run of {span} image tokens per row, got counts "
                         f"{counts.tolist()}")
    ring = rings(grid).to(input_ids.device)
    num_rings = (grid + 1) // 2
    column = torch.arange(length, device=input_ids.device)[None, :].expand(batch, length)
    start = starts[:, None]
    offset = (column - start).clamp(0, span - 1)
    positions = torch.where(column < start, column,
                            torch.where(column < start + span, start + ring[offset],
                                        column - span + num_rings))
    keep = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()[None].expand(batch, -1, -1)
    keep = keep & attention_mask.bool()[:, None, :]
    ring_of = torch.where(is_image, ring[offset], -1)  # (B, L), -1 outside the image
    inside = is_image[:, :, None] & is_image[:, None, :]
    concentric = ring_of[:, None, :] <= ring_of[:, :, None]  # key ring <= query ring
    keep = torch.where(inside, concentric, keep)
    return {"position_ids": positions, "attention_mask": keep[:, None]}

