"""``attnlab.carve``: CARVE end to end on one image and question (Ge et al., arXiv 2509.06461; METHODS.md #19, low
confidence, § not available (abstract only); the math is :mod:`attnlab.analyses.carve`).

1. The question q and the generic instruction g are encoded with the same image by the model's processor (its chat
   template when it has one, else ``"<image token>\\n{text}"``).
2. The contrast map Â = A(x, q) / (A(x, g) + λ) over the image's token grid (queries: the question's tokens in
   the task prompt, the generic instruction's in the generic one; ``layers`` averaged), and the top ``keep``
   fraction of tokens.
3. The original image is masked outside the kept tokens: the token grid is stretched over the whole image
   (nearest); exact for square images and processors that resize without cropping, approximate under a centre
   crop (CLIP's processor crops the longer side).
4. The masked image is re-queried: greedy generation of ``max_new_tokens`` for both images.

Shapes: rows × cols the image's token grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnlab.analyses.vlm_batches import prompt_markers, question_mask
from attnlab.analyses.carve import CarveMap, carve_maps
from attnlab.analyses.vhd import image_mask, image_token_ids
from attnlab.capture.architectures import model_facts
from attnlab.capture.vlm_runner import VisionRunner
from attnlab.errors import ConfigError


@dataclass
class CarveResult:
    """What :func:`carve` returns.

    Attributes:
        map: the :class:`attnlab.analyses.carve.CarveMap` (task, generic and contrast grids, kept tokens).
        masked_image: the PIL image with everything outside the kept tokens filled.
        answer: the model's answer on the masked image. original_answer: on the original image.
        layers: the layers averaged (the default resolved).
    """

    map: CarveMap
    masked_image: Any
    answer: str
    original_answer: str
    layers: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Grids as nested lists (``generic_map``: the generic instruction's), kept tokens as [row, col] pairs, the
        layers used, the answers."""
        return {"rows": self.map.span.rows, "cols": self.map.span.cols, "layers": list(self.layers),
                "contrast": self.map.contrast.tolist(), "task": self.map.task.tolist(),
                "generic_map": self.map.generic.tolist(), "kept": self.map.keep.nonzero().tolist(),
                "answer": self.answer, "original_answer": self.original_answer}


def _unpack(model: Any, processor: Any) -> tuple[Any, Any]:
    """(model, processor) from a LoadedModel (``.model``, ``.processor``) or the two given."""
    if not isinstance(model, torch.nn.Module):  # a LoadedModel
        processor = processor if processor is not None else getattr(model, "processor", None)
        model = model.model
    if processor is None:
        raise ConfigError("carve needs the model's processor (load_model gives it as loaded.processor)")
    return model, processor


def encode(processor: Any, image: Any, text: str) -> dict[str, torch.Tensor]:
    """Model kwargs for one image and one user text: the processor's chat template when it has one (a user turn
    with the image then the text, generation prompt added), else ``"<image token>\\n{text}"``."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt = f"{getattr(processor, 'image_token', '<image>')}\n{text}"
    return dict(processor(images=[image], text=[prompt], return_tensors="pt"))


def mask_image(image: Any, keep: torch.Tensor, fill: Sequence[int] = (0, 0, 0)) -> Any:
    """A copy of the PIL ``image`` with the pixels outside the kept tokens (``keep`` (rows, cols) bool, stretched
    over the whole image, nearest) set to ``fill`` (RGB)."""
    import numpy as np
    from PIL import Image

    rgb = np.array(image.convert("RGB"))
    grid = torch.nn.functional.interpolate(keep.float()[None, None], size=rgb.shape[:2], mode="nearest")[0, 0]
    outside = ~grid.bool().numpy()
    rgb[outside] = np.array(list(fill), dtype=rgb.dtype)
    return Image.fromarray(rgb, "RGB")


def _answer(model: Any, processor: Any, batch: dict[str, torch.Tensor], max_new_tokens: int) -> str:
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, batch["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def carve(model: Any, image: Any, question: str, *, processor: Any = None, generic: str = "Describe this image.",
          layers: Sequence[int] | None = None, lam: float = 1e-3, keep: float = 0.3,
          fill: Sequence[int] = (0, 0, 0), max_new_tokens: int = 20) -> CarveResult:
    """CARVE on one image (a PIL image or a path) and question; see the module docstring.

    Args:
        model: a LoadedModel of a vision-language model (or the transformers model, with ``processor``).
        layers: layers averaged (default the second half). lam: λ ≥ 0. keep: fraction of image tokens kept.
        fill: RGB of masked pixels. max_new_tokens: tokens generated per answer (0: no generation, answers "").
    Raises:
        ConfigError: no processor, not a vision-language model, the prompt holds not exactly one image or no
            question text after it, bad lam / keep / layers.
    """
    from PIL import Image

    model, processor = _unpack(model, processor)
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    image = image.convert("RGB")
    facts = model_facts(model)
    ids = image_token_ids(facts, model)
    chosen = list(range(facts.num_layers // 2, facts.num_layers)) if layers is None else list(layers)
    if not chosen or min(chosen) < 0 or max(chosen) >= facts.num_layers:
        raise ConfigError(f"carve: layers must be in 0…{facts.num_layers - 1}, got {chosen}")
    runner = VisionRunner(model, processor.tokenizer, facts)
    device = next(model.parameters()).device
    task, plain = ({k: v.to(device) for k, v in encode(processor, image, text).items()} for text in (question, generic))
    markers, ends = prompt_markers(processor.tokenizer)
    asked = [question_mask(b["input_ids"], b["attention_mask"].bool(), image_mask(b["input_ids"], ids), markers, ends)
             for b in (task, plain)]
    maps, _, _ = carve_maps(runner, task, plain, ids=ids, queries=(asked[0], asked[1]), layers=chosen, lam=lam,
                            keep=keep, merge=int((facts.vision or {}).get("merge") or 1))
    if len(maps) != 1:
        raise ConfigError(f"carve takes one image; the encoded prompt holds {len(maps)} image token runs")
    masked = mask_image(image, maps[0].keep, fill)
    answers = ["", ""]
    if max_new_tokens > 0:
        answers = [_answer(model, processor, encode(processor, picture, question), max_new_tokens)
                   for picture in (masked, image)]
    return CarveResult(maps[0], masked, answers[0], answers[1], tuple(chosen))


__all__ = ["CarveResult", "carve", "encode", "mask_image"]
