"""ModelFacts: the one record of what attnlab knows about a model — its sizes and where it came from.

It replaces the four earlier forms (``ModelShape``, ``ModelInfo``, the ``model_info()`` dict and the report's
guess from row indices). Probes are bound to it, analyses are prepared with it, the planner reads it, and it travels
in ``results.json`` under ``"model"`` (:meth:`ModelFacts.to_dict`), so ``attnlab render`` knows the sizes from the
JSON alone. :func:`attnlab.capture.architectures.model_facts` builds it from a transformers model; this module
imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from attnlab.errors import ConfigError


@dataclass(frozen=True)
class ModelFacts:
    """Sizes and provenance of one model.

    Attributes:
        num_layers: attention layers (transformer blocks).
        num_heads: query heads per layer. num_kv_heads: key/value heads (GQA: query head h reads kv head
            ``h // (num_heads // num_kv_heads)``; equal to num_heads without GQA).
        head_dim: width of one query/key head. hidden_size: width of the residual stream.
        vocab_size: rows of the embedding (None when unknown).
        max_positions: ``max_position_embeddings`` of the config (None when unknown).
        causal: True for decoders, False for encoders such as BERT.
        model_type: the config's ``model_type`` (``"llama"``, ``"bert"``, …), or None.
        rope_theta: RoPE base, or None when the model has no rotary embedding.
        rope_type: ``"default"``, ``"dynamic"``, ``"linear"``, ``"yarn"`` …, or None without RoPE.
        position_embedding: ``"rope"``, ``"absolute"`` (learned positions the model adds itself, e.g. GPT-2) or
            ``"none"``.
        name, source, format, file_sha256: provenance (bundled name / path / hub id; where the weights were read;
            ``"gguf"`` | ``"safetensors"`` | ``"hub"``; sha256 of the weights file), None when unknown.
        class_name: the model's Python class. dtype, device: of its first parameter.
        modality: ``"text"``, or ``"vision-language"`` for a model whose decoder reads image tokens (LLaVA, Qwen2-VL,
            Idefics3, PaliGemma, Gemma 3); then the sizes above are its language model's, and ``causal`` is True
            (its decoder is causal on text; PaliGemma's prefix and Gemma 3's image blocks are bidirectional, which
            the call records say per call).
        image_token_ids: the token ids that mark image (and video) positions in ``input_ids`` (empty for text).
        vision: the vision tower's facts (``image_size``, ``patch_size``, ``merge`` = the factor the processor's
            ``image_grid_thw`` height and width are divided by to count tokens (Qwen2-VL 2, else 1), ``num_layers``,
            ``tokens_per_image`` when the config fixes it), or None for text models.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int | None = None
    max_positions: int | None = None
    causal: bool = True
    model_type: str | None = None
    rope_theta: float | None = None
    rope_type: str | None = None
    position_embedding: str = "rope"
    name: str | None = None
    source: str | None = None
    format: str | None = None
    file_sha256: str | None = None
    class_name: str | None = None
    dtype: str | None = None
    device: str | None = None
    modality: str = "text"
    image_token_ids: tuple[int, ...] = ()
    vision: dict[str, Any] | None = dataclasses.field(default=None, hash=False)

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"model {field} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}")

    @property
    def num_kv_groups(self) -> int:
        """Query heads per kv head (``num_heads // num_kv_heads``)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; the class name is stored under ``"class"`` (the results.json key since schema v1)."""
        data = dataclasses.asdict(self)
        data["class"] = data.pop("class_name")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFacts:
        """Inverse of :meth:`to_dict`; unknown keys (provenance added by later versions) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if "class" in data and "class_name" not in values:
            values["class_name"] = data["class"]
        if "image_token_ids" in values:
            values["image_token_ids"] = tuple(values["image_token_ids"])
        return cls(**values)
