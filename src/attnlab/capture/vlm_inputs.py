"""Image + prompt inputs for vision-language models: items, a JSONL manifest, and the model's batches.

    items = read_manifest("items.jsonl")                  # or [ImageTextItem("cat.png", "What is on the mat?")]
    kwargs, roles = build_batch(loaded.processor, items[:4])
    with attnlab.roles.given_roles(roles):
        loaded.model(**kwargs)

An item is one sequence: one or more images, a prompt, optionally the answer (teacher-forced after the prompt, so
probes see the answer tokens read with the image) and a system prompt. :func:`build_batch` renders each item as
text (the processor's chat template, or plain ``system\\n<image…>prompt answer``), lets the processor expand the
image placeholders and pad the batch, and returns the model kwargs with the :class:`attnlab.roles.TokenRoles` of
every column: image tokens (one :class:`attnlab.roles.ImageSpan` per image or tile, with its grid), text, system
and pad. :class:`ImageTextBatches` is the pipeline's form (``attnlab report --image … --prompt …``,
``--manifest``): batches of items, iterable like :class:`attnlab.text.Windows`, each batch a dict of model
kwargs that carries its roles (:func:`batch_roles`).

Manifest format (JSON Lines, one object per line, blank lines skipped; image paths relative to the manifest's
folder)::

    {"image": "cat.png", "prompt": "What is on the mat?", "answer": "A cat.", "system": "Answer briefly."}
    {"images": ["a.png", "b.png"], "prompt": "Which picture is brighter?"}

Errors are one-line :class:`attnlab.errors.ConfigError`s naming the file (and the manifest line).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnlab.errors import ConfigError, one_line

logger = logging.getLogger(__name__)

MANIFEST_KEYS = ("image", "images", "prompt", "answer", "system")
QWEN_VISION_START, QWEN_VISION_END = "<|vision_start|>", "<|vision_end|>"


@dataclass(frozen=True)
class ImageTextItem:
    """One sequence: images + prompt (+ answer, + system prompt).

    Attributes:
        image: one image path or a list of them (in the order they appear in the sequence).
        prompt: the user's text. An image placeholder already in the prompt (the processor's image token, e.g.
            ``<image>``) places the images itself; then there must be one per image.
        answer: text teacher-forced after the prompt (the assistant's turn with a chat template), or None.
        system: a system prompt before everything (role ``system``), or None.

    Raises:
        ConfigError: no image, a path that is not a string/Path, or a prompt/answer/system that is not a string.
    """

    image: Path | tuple[Path, ...]
    prompt: str
    answer: str | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        raw = self.image if isinstance(self.image, (list, tuple)) else [self.image]
        if not raw or not all(isinstance(p, (str, os.PathLike)) for p in raw):
            raise ConfigError(f"image must be a path or a non-empty list of paths, got {self.image!r}")
        object.__setattr__(self, "image", Path(raw[0]) if len(raw) == 1 and not isinstance(
            self.image, (list, tuple)) else tuple(Path(p) for p in raw))
        if not isinstance(self.prompt, str):
            raise ConfigError(f"prompt must be a string, got {self.prompt!r}")
        for name in ("answer", "system"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be a string or None, got {value!r}")

    @property
    def images(self) -> tuple[Path, ...]:
        """The image paths as a tuple."""
        return self.image if isinstance(self.image, tuple) else (self.image,)


def _manifest_item(data: Any, folder: Path, where: str) -> ImageTextItem:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object with image/images and prompt, got {json.dumps(data)[:60]}")
    unknown = sorted(set(data) - set(MANIFEST_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(MANIFEST_KEYS)}")
    if ("image" in data) == ("images" in data):
        raise ConfigError(f"{where}: give exactly one of \"image\" (a path) or \"images\" (a list of paths)")
    paths = [data["image"]] if "image" in data else data["images"]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(f"{where}: \"image\" must be a path string and \"images\" a non-empty list of them")
    if not isinstance(data.get("prompt"), str):
        raise ConfigError(f"{where}: \"prompt\" (a string) is required")
    for key in ("answer", "system"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ConfigError(f"{where}: \"{key}\" must be a string")
    resolved = [Path(p).expanduser() if Path(p).expanduser().is_absolute() else folder / p for p in paths]
    for path in resolved:
        if not path.is_file():
            raise ConfigError(f"{where}: image file {path} does not exist")
    image = resolved[0] if "image" in data else tuple(resolved)
    return ImageTextItem(image, data["prompt"], data.get("answer"), data.get("system"))


def read_manifest(path: str | os.PathLike[str]) -> list[ImageTextItem]:
    """The items of a JSONL manifest (module docstring); image paths resolved against the manifest's folder.

    Raises:
        ConfigError: a missing/unreadable/non-UTF-8 file, no items, or a bad line (``FILE:LINE: what is wrong``):
            not JSON, not an object, unknown keys, neither or both of image/images, no prompt, a missing image
            file.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"manifest {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read manifest {path}: {one_line(error)}") from None
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        items.append(_manifest_item(data, path.parent, where))
    if not items:
        raise ConfigError(f"manifest {path} has no items; expected one JSON object per line with image and prompt")
    return items


def check_image(path: str | os.PathLike[str]) -> None:
    """ConfigError (one line) if ``path`` is missing or its header is not an image PIL knows (reads the header
    only: a corrupt file fails before the model loads)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"image file {path} does not exist")
    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ConfigError(f"cannot read image {path}: {one_line(error, 200)}") from None


def read_image(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """``(RGB PIL.Image, record)`` of the image at ``path``, read once: the record (results.json
    ``inputs[i]["images"]``: ``path`` absolute, ``sha256`` of the bytes read, ``width``, ``height``) describes
    exactly the bytes decoded. ConfigError (one line) if it is missing or not an image PIL can read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"image file {path} does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot read image {path}: {one_line(error, 200)}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ConfigError(f"cannot read image {path}: {one_line(error, 200)}") from None
    record = {"path": str(path.resolve()), "sha256": hashlib.sha256(data).hexdigest(), "width": int(image.width),
              "height": int(image.height)}
    return image, record


def open_image(path: str | os.PathLike[str]) -> Any:
    """The image at ``path`` as an RGB ``PIL.Image`` (fully read). ConfigError (one line) if it is missing or
    not an image PIL can read."""
    return read_image(path)[0]


def image_record(path: str | os.PathLike[str], image: Any = None) -> dict[str, Any]:
    """``{"path", "sha256", "width", "height"}`` of one image (results.json ``inputs[i]["images"]``)."""
    return read_image(path)[1]


def image_token(processor: Any) -> str:
    """The processor's image placeholder token (``<image>``, ``<|image_pad|>``, ``<start_of_image>`` …)."""
    token = getattr(processor, "image_token", None) or getattr(processor, "boi_token", None)
    if not isinstance(token, str):
        raise ConfigError(f"{type(processor).__name__} names no image token; is this a vision-language processor?")
    return token


def processor_image_ids(processor: Any) -> tuple[int, ...]:
    """The token id(s) that stand for image (and video) features in the processor's output."""
    found = [getattr(processor, key, None) for key in ("image_token_id", "video_token_id")]
    ids = tuple(dict.fromkeys(i for i in found if isinstance(i, int)))  # the image id first
    return ids or (processor.tokenizer.convert_tokens_to_ids(image_token(processor)),)


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _size(size: Any) -> tuple[int, int] | None:
    """(height, width) of an image processor's ``size``/``crop_size`` (a dict or SizeDict), or None."""
    height, width = (size.get(k) if isinstance(size, dict) else getattr(size, k, None) for k in ("height", "width"))
    return (height, width) if _number(height) and _number(width) else None


def processor_tokens_per_image(processor: Any) -> int | None:
    """Image tokens of one image (or tile) when the processor fixes it, else None (Qwen2-VL's vary with the image):
    its ``image_seq_length`` / ``image_seq_len`` / ``num_image_tokens`` (PaliGemma, Gemma 3, Idefics3), or
    LLaVA's ``(crop height / patch) · (crop width / patch)`` plus its extra tokens (the CLS token, dropped by the
    ``"default"`` feature strategy). The same number the session reads from the config
    (``facts.vision["tokens_per_image"]``)."""
    for key in ("image_seq_length", "image_seq_len", "num_image_tokens"):
        if _number(getattr(processor, key, None)):
            return getattr(processor, key)
    patch, images = _number(getattr(processor, "patch_size", None)), getattr(processor, "image_processor", None)
    crop = getattr(images, "do_center_crop", False)
    shape = _size(getattr(images, "crop_size" if crop else "size", None))
    if patch is None or shape is None:
        return None
    extra = int(getattr(processor, "num_additional_image_tokens", 0) or 0)
    default = getattr(processor, "vision_feature_select_strategy", None) == "default"
    return (shape[0] // patch) * (shape[1] // patch) + extra - (1 if default else 0)  # as LlavaProcessor counts


def fed_region(processor: Any, width: int, height: int) -> dict[str, Any]:
    """How the image processor fed a ``width`` × ``height`` image to the vision tower (results.json
    ``inputs[i]["images"][k]["fed"]`` and ``"crop"``): ``"center-crop"`` when it crops the centre after resizing
    the shorter side (CLIP's, LLaVA's), with ``crop`` = [left, top, right, bottom] in the file's pixels (the part
    the token grid covers); ``"resize"`` otherwise (the whole picture, possibly padded or tiled)."""
    images = getattr(processor, "image_processor", None)
    if not getattr(images, "do_center_crop", False):
        return {"fed": "resize"}
    record: dict[str, Any] = {"fed": "center-crop"}
    crop, size = _size(getattr(images, "crop_size", None)), getattr(images, "size", None)
    shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    if crop and _number(shortest):
        scale = shortest / min(width, height)
        box_w, box_h = min(width, crop[1] / scale), min(height, crop[0] / scale)
        left, top = (width - box_w) / 2, (height - box_h) / 2
        record["crop"] = [round(left, 2), round(top, 2), round(left + box_w, 2), round(top + box_h, 2)]
    return record


def _placeholder(processor: Any) -> str:
    """What stands for one image in a plain (template-free) text: the image token, wrapped in Qwen2-VL's
    ``<|vision_start|> … <|vision_end|>`` where the tokenizer has those (its rope index finds images by them)."""
    token = image_token(processor)
    vocab = processor.tokenizer.get_vocab()
    if QWEN_VISION_START in vocab and QWEN_VISION_END in vocab and token != QWEN_VISION_START:
        return QWEN_VISION_START + token + QWEN_VISION_END
    return token


def _render(processor: Any, item: ImageTextItem, chat: bool) -> tuple[str, str | None]:
    """``(text, system prefix)`` of one item; the prefix is the start of ``text`` that is the system prompt."""
    count = len(item.images)
    placed = item.prompt.count(image_token(processor))
    if placed and placed != count:
        raise ConfigError(f"the prompt places {placed} image token(s) {image_token(processor)} but the item has "
                          f"{count} image(s)")
    if chat:
        system = [{"role": "system", "content": [{"type": "text", "text": item.system}]}] if item.system else []
        user = [{"type": "image"}] * (0 if placed else count) + [{"type": "text", "text": item.prompt}]
        messages = system + [{"role": "user", "content": user}]
        if item.answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": item.answer}]})
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=item.answer is None)
        prefix = processor.apply_chat_template(system, tokenize=False) if system else None
        return text, prefix if prefix and text.startswith(prefix) else None
    prefix = f"{item.system}\n" if item.system else None
    # one line per image: adjacent placeholders would make one run of image tokens, read as one image
    body = ("" if placed else (_placeholder(processor) + "\n") * count) + item.prompt
    answer = "" if item.answer is None else " " + item.answer
    return (prefix or "") + body + answer, prefix


def _system_columns(processor: Any, item: ImageTextItem, text: str, prefix: str | None) -> list[int] | None:
    """Indices (among the sequence's real tokens) of the system prompt's tokens; [] without one; None when it
    cannot be located (logged). A rendered system turn that starts the text marks the whole turn (a BOS the
    tokenizer adds counts with it); a template that folds the system prompt into the user turn (Gemma 3) marks
    the tokens that spell ``item.system``, found in the text with the tokenizer's offsets, when they come before
    any image (whose tokens the processor expands)."""
    if not item.system:
        return []
    tokenizer = processor.tokenizer
    if prefix and item.system in prefix:  # a rendered system turn that holds the prompt starts the text
        return list(range(len(tokenizer(prefix)["input_ids"])))
    start = text.find(item.system)
    images = [i for i in (text.find(image_token(processor)), text.find(QWEN_VISION_START)) if i >= 0]
    end = start + len(item.system)
    if start < 0 or (images and end > min(images)):
        logger.warning("system prompt not located in the rendered text before the images; its tokens are marked "
                       "text, not system")
        return None
    try:
        offsets = tokenizer(text[:end], return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError) as error:
        logger.warning("system prompt tokens unknown (the tokenizer gives no offsets: %s); marked text",
                       one_line(error, 120))
        return None
    return [index for index, (a, b) in enumerate(offsets) if b > a and b > start and a < end]


def _roles(processor: Any, kwargs: dict[str, Any], image_token_ids: Sequence[int] | None,
           tokens_per_image: int | None, system: torch.Tensor | None = None) -> Any:
    """The :class:`attnlab.roles.TokenRoles` of a processor output (see :func:`build_batch`)."""
    from attnlab.roles import TokenRoles

    ids, valid = kwargs["input_ids"], kwargs["attention_mask"].bool()
    grids, image_id = kwargs.get("image_grid_thw"), getattr(processor, "image_token_id", None)
    merge = int(getattr(getattr(processor, "image_processor", None), "merge_size", 1) or 1) if grids is not None else 1
    if grids is not None and isinstance(image_id, int):
        grids = {image_id: grids}  # the image token's grids (videos would have their own)
    if tokens_per_image is None:
        tokens_per_image = processor_tokens_per_image(processor)
    return TokenRoles.from_input_ids(ids, valid, tuple(image_token_ids or processor_image_ids(processor)),
                                     grids=grids, merge=merge, system=system if system is not None and system.any()
                                     else None, tokens_per_image=tokens_per_image)


def _encode(processor: Any, items: Sequence[ImageTextItem], images: list[list[Any]], chat: bool,
            image_token_ids: Sequence[int] | None, tokens_per_image: int | None) -> tuple[dict[str, Any], Any]:
    """(kwargs on the CPU, roles) of ``items`` with their opened ``images``: one processor call."""
    rendered = [_render(processor, item, chat) for item in items]
    try:
        encoded = processor(images=images, text=[text for text, _ in rendered], return_tensors="pt", padding=True)
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as error:
        raise ConfigError(f"{type(processor).__name__} rejected the inputs: {one_line(error, 240)}") from None
    kwargs = dict(encoded.items())
    valid = kwargs["attention_mask"].bool()
    system = torch.zeros_like(valid)
    for row, (item, (text, prefix)) in enumerate(zip(items, rendered)):
        columns = _system_columns(processor, item, text, prefix)
        real = valid[row].nonzero().flatten()
        system[row, real[[c for c in columns or () if c < len(real)]]] = True
    return kwargs, _roles(processor, kwargs, image_token_ids, tokens_per_image, system)


def span_sources(processor: Any, items: Sequence[ImageTextItem], images: list[list[Any]], roles: Any, *,
                 image_token_ids: Sequence[int] | None = None, tokens_per_image: int | None = None
                 ) -> list[list[dict[str, int | None]]]:
    """Which input file (and tile) each image span of each sequence came from (results.json
    ``inputs[i]["spans"]``): per sequence one ``{"image": file index, "tile": t}`` per span, in span order.

    A sequence with as many spans as files maps span k to file k. Where the processor splits images into tiles
    (Idefics3/SmolVLM image splitting, LLaVA-NeXT anyres, Gemma 3 pan & scan) each file is encoded alone once to
    count its spans, and the spans are given out file after file; when those counts do not add up to the
    sequence's spans, every entry is ``{"image": None, "tile": None}`` (unknown: the report draws no file)."""
    sources = []
    for row, (item, opened) in enumerate(zip(items, images)):
        count = len(roles.spans(row))
        if count == len(opened):
            sources.append([{"image": k, "tile": 0} for k in range(count)])
            continue
        alone = [ImageTextItem(path, "") for path in item.images]
        tiles = [len(_encode(processor, [one], [[image]], False, image_token_ids, tokens_per_image)[1].spans(0))
                 for one, image in zip(alone, opened)]
        if sum(tiles) != count:
            logger.warning("sequence %d: %d image spans but its %d file(s) give %s alone; spans not mapped to files",
                           row, count, len(opened), tiles)
            sources.append([{"image": None, "tile": None}] * count)
            continue
        sources.append([{"image": k, "tile": t} for k, n in enumerate(tiles) for t in range(n)])
    return sources


def build_batch(processor: Any, items: Sequence[ImageTextItem], *, chat_template: bool | None = None,
                image_token_ids: Sequence[int] | None = None, tokens_per_image: int | None = None,
                device: str | torch.device | None = None, dtype: torch.dtype | None = None
                ) -> tuple[dict[str, Any], Any]:
    """The model kwargs for ``items`` (one sequence each, padded) and their token roles.

    Args:
        processor: a VLM processor (``LoadedModel.processor``).
        items: the sequences; each may hold several images.
        chat_template: True renders each item with the processor's chat template (system / user with the image
            parts then the prompt / assistant with the answer, or the generation prompt without one); False
            writes ``system\\n`` + one placeholder line per image + prompt + `` answer``; None (default) uses the
            template when the processor has one.
        image_token_ids: ids of image tokens (default: the processor's ``image_token_id``/``video_token_id``;
            pass ``facts.image_token_ids``).
        tokens_per_image: image tokens of one image when the model fixes it: a run of k times as many image
            tokens is k adjacent images, as the session reads them. Default: the processor's
            (:func:`processor_tokens_per_image`, equal to ``facts.vision["tokens_per_image"]``).
        device, dtype: move tensors to ``device``; cast floating ones (pixel values) to ``dtype``.

    Returns:
        ``(kwargs, roles)``: ``kwargs`` is the processor's output as a dict (``input_ids`` (B, L) long,
        ``attention_mask`` (B, L), ``pixel_values`` …, Qwen2-VL's ``image_grid_thw`` (num_images, 3)), ready
        for ``model(**kwargs)``; ``roles`` is a :class:`attnlab.roles.TokenRoles` over the same (B, L) columns:
        each run of image tokens one image (tile), or k images with ``tokens_per_image``; its grid from
        ``image_grid_thw`` (merged by the image processor's ``merge_size``) or square; the system prompt's tokens
        ``system`` (:func:`_system_columns`; a prompt that cannot be located is logged and stays ``text``);
        padding ``pad``. :func:`span_sources` maps its spans to the input files.

    Raises:
        ConfigError: no items, a missing or unreadable image, prompt image tokens that do not match the images,
            ``chat_template=True`` with a processor without one, or a processor that rejects the inputs (its
            message, one line).
    """
    chat = _chat(processor, items, chat_template)
    images = [[open_image(path) for path in item.images] for item in items]
    kwargs, roles = _encode(processor, items, images, chat, image_token_ids, tokens_per_image)
    return _moved(kwargs, device, dtype), roles


def _chat(processor: Any, items: Sequence[ImageTextItem], chat_template: bool | None) -> bool:
    if not items:
        raise ConfigError("build_batch needs at least one item")
    chat = bool(getattr(processor, "chat_template", None)) if chat_template is None else chat_template
    if chat and not getattr(processor, "chat_template", None):
        raise ConfigError(f"{type(processor).__name__} has no chat template; use chat_template=False")
    return chat


def _moved(kwargs: dict[str, Any], device: Any, dtype: Any) -> dict[str, Any]:
    moved = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(dtype) if dtype is not None and value.is_floating_point() else value
            value = value.to(device) if device is not None else value
        moved[key] = value
    return moved


class RoleBatch(dict):
    """A batch of model kwargs (a dict, so ``model(**batch)`` works) that carries its ``roles``."""

    roles: Any = None


def batch_roles(batch: Any) -> contextlib.AbstractContextManager:
    """``attnlab.roles.given_roles(batch.roles)`` for a :class:`RoleBatch`, else a no-op context."""
    roles = getattr(batch, "roles", None)
    if roles is None:
        return contextlib.nullcontext()
    from attnlab.roles import given_roles

    return given_roles(roles)


@dataclass
class ImageTextBatches:
    """Image-text items as batches for a probe run, shaped like :class:`attnlab.text.Windows`.

    ``windows`` has one JSON-ready dict per item (index, source = the image paths, ids, tokens, pieces of the
    unpadded sequence; as Windows'), ``inputs`` the results.json ``"inputs"`` records (sequence, prompt, answer,
    system, images with path, sha256, width, height, fed (+ crop), and spans: the file and tile of each image
    span). ``encoded`` holds each batch's processor output (CPU) and roles, made once by
    :func:`image_text_batches`; iterating yields them as :class:`RoleBatch` dicts on ``device`` in ``dtype``.
    """

    items: list[ImageTextItem]
    windows: list[dict[str, Any]]
    inputs: list[dict[str, Any]]
    encoded: list[tuple[dict[str, Any], Any]]
    batch_size: int = 1
    device: Any = None
    dtype: Any = None
    bos_policy: str = "processor"
    bos_added: bool = False
    files: list[str] = field(default_factory=list)

    @property
    def num_windows(self) -> int:
        return len(self.windows)

    def _chosen(self) -> list[tuple[dict[str, Any], Any]]:
        """The encoded batches of ``windows`` (a copy with a slice of them, as the pipeline makes per shard, keeps
        only the batches holding those items)."""
        first = {int(window["index"]) for window in self.windows}
        return [pair for number, pair in enumerate(self.encoded) if number * self.batch_size in first]

    def __len__(self) -> int:
        return len(self._chosen())

    def __iter__(self) -> Iterator[RoleBatch]:
        for kwargs, roles in self._chosen():
            batch = RoleBatch(_moved(kwargs, self.device, self.dtype))
            batch.roles = roles
            yield batch


def image_text_batches(processor: Any, items: Sequence[ImageTextItem], *, batch_size: int = 1,
                       chat_template: bool | None = None, image_token_ids: Sequence[int] = (),
                       tokens_per_image: int | None = None, device: Any = None, dtype: Any = None
                       ) -> ImageTextBatches:
    """:class:`ImageTextBatches` for ``items``, built up front so a bad image or prompt fails before any probe
    runs (ConfigError, one line): each image file is read once (its record hashes the bytes decoded) and each
    batch of ``batch_size`` items is encoded once (:func:`build_batch`'s rendering and roles) and kept on the CPU
    with its pixel values until the run feeds it (mind the memory of a very large manifest: split it)."""
    chat = _chat(processor, items, chat_template)
    ids_of = tuple(image_token_ids) or None
    windows, inputs, encoded = [], [], []
    tokenizer = processor.tokenizer
    for first in range(0, len(items), batch_size):
        chunk = list(items[first : first + batch_size])
        read = [[read_image(path) for path in item.images] for item in chunk]
        images = [[image for image, _ in pairs] for pairs in read]
        kwargs, roles = _encode(processor, chunk, images, chat, ids_of, tokens_per_image)
        sources = span_sources(processor, chunk, images, roles, image_token_ids=ids_of,
                               tokens_per_image=tokens_per_image)
        for row, (item, pairs) in enumerate(zip(chunk, read)):
            index = first + row
            ids = kwargs["input_ids"][row][kwargs["attention_mask"][row].bool()].tolist()
            windows.append({"index": index, "source": [str(p) for p in item.images], "start_token": 0, "ids": ids,
                            "tokens": [tokenizer.decode([i]) for i in ids],
                            "pieces": tokenizer.convert_ids_to_tokens(ids)})
            records = [{**record, **fed_region(processor, record["width"], record["height"])}
                       for _, record in pairs]
            inputs.append({"sequence": index, "prompt": item.prompt, "answer": item.answer, "system": item.system,
                           "images": records, "spans": sources[row]})
        encoded.append((kwargs, roles))
    return ImageTextBatches(list(items), windows, inputs, encoded, batch_size, device, dtype,
                            files=sorted({str(p) for item in items for p in item.images}))
