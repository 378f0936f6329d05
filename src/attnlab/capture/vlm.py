"""Vision-language models inside a session: which attention attnlab takes over, and each forward's token roles.

A transformers VLM (LLaVA, Qwen2-VL, Idefics3/SmolVLM, PaliGemma, Gemma 3) is one model with a vision tower and a
language model, each with its own sub-config. attnlab's methods act on the language model's attention over image
and text tokens, so the session switches only the text sub-config to the attnlab backend
(``set_attn_implementation({"text_config": "attnlab"})``) and the vision tower keeps its own implementation.

Roles per forward (:class:`attnlab.roles.TokenRoles`): image where ``input_ids`` holds one of the model's image
token ids (``facts.image_token_ids``), each image's grid from ``image_grid_thw`` / ``video_grid_thw`` when the
processor gives them (Qwen2-VL) or a square otherwise; a decoding step appends ``generated`` tokens to the roles of
the forward before it; :func:`attnlab.roles.given_roles` overrides the derivation.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.facts import ModelFacts
from attnlab.roles import PAD, TokenRoles, current_given_roles

def text_config_key(model: nn.Module) -> str | None:
    """The name of the model's text sub-config (``"text_config"``) when it has a vision one too, else None."""
    config = model.config
    sub = getattr(config, "sub_configs", None) or {}
    if "vision_config" not in sub and getattr(config, "vision_config", None) is None:
        return None
    for key in ("text_config", "language_config"):
        if key in sub or getattr(config, key, None) is not None:
            return key
    return None


class AttentionSwitch:
    """Switch a model's (language model's) attention to a backend and back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.key = text_config_key(model)
        self.previous: Any = None

    def enter(self, backend: str) -> None:
        config = self.model.config
        if self.key is None:
            self.previous = config._attn_implementation
            self.model.set_attn_implementation(backend)
            return
        self.previous = {name: getattr(config, name)._attn_implementation
                         for name in config.sub_configs if getattr(config, name, None) is not None}
        self.model.set_attn_implementation({self.key: backend})

    def exit(self) -> None:
        if self.previous is not None:
            self.model.set_attn_implementation(self.previous)
            self.previous = None


class RoleReader:
    """``reader(input_ids, valid, kwargs) -> TokenRoles | None`` for each forward pass of one session.

    - A forward whose 2-D mask covers only its own tokens: roles from ``input_ids`` (image ids, grids from
      ``image_grid_thw`` / ``video_grid_thw`` or multi-axis ``position_ids``, adjacent images split by the
      model's tokens per image).
    - A forward over cached tokens (mask columns > new tokens) continues the previous forward's roles: one new
      token is ``generated`` (a decoding step); several are read from their ids (a new turn, chunked prefill).
    - :func:`attnlab.roles.given_roles` overrides the derivation for prompts.
    None for text-only models unless roles are given, and where the columns cannot be matched to the previous
    forward (the session then refuses role-restricted edits on that call).
    """

    def __init__(self, model: nn.Module, facts: ModelFacts) -> None:
        config = model.config
        self.token_ids = facts.image_token_ids
        vision = facts.vision or {}
        self.merge = int(vision.get("merge", 1) or 1)
        self.tokens_per_image = vision.get("tokens_per_image")
        video = getattr(config, "video_token_id", None)
        self.video_id = video if isinstance(video, int) and video in self.token_ids else None
        self.image_ids = tuple(token for token in self.token_ids if token != self.video_id)
        self.last: TokenRoles | None = None

    def __call__(self, input_ids: Tensor | None, valid: Tensor, kwargs: dict[str, Any]) -> TokenRoles | None:
        roles = self._read(input_ids, valid, kwargs)
        if roles is not None:
            roles = roles.to(valid.device)
            roles = TokenRoles(roles.codes.masked_fill(~valid.bool(), PAD), roles.images)
        self.last = roles
        return roles

    def _read(self, input_ids: Tensor | None, valid: Tensor, kwargs: dict[str, Any]) -> TokenRoles | None:
        batch, columns = valid.shape
        new = columns if input_ids is None else input_ids.shape[1]
        given = current_given_roles()
        if new < columns:  # over cached tokens: continue the previous forward's roles
            previous = self.last
            if previous is None or tuple(previous.codes.shape) != (batch, columns - new):
                previous = given if given is not None and tuple(given.codes.shape) == (batch, columns - new) \
                    else None
            if previous is None:
                return None
            if new == 1 or input_ids is None:
                return previous.extend_generated(new)
            return previous.then(self._derive(input_ids, valid[:, columns - new:], kwargs))
        if given is not None:
            if tuple(given.codes.shape) != (batch, columns):
                raise ConfigError(f"given_roles has codes of shape {tuple(given.codes.shape)} but the forward has "
                                  f"{batch} sequences of {columns} tokens")
            return given
        if input_ids is None or not self.token_ids:
            return None
        return self._derive(input_ids, valid, kwargs)

    def _derive(self, input_ids: Tensor, valid: Tensor, kwargs: dict[str, Any]) -> TokenRoles:
        grids = {}
        for token, key in ((self.image_ids[0] if self.image_ids else None, "image_grid_thw"),
                           (self.video_id, "video_grid_thw")):
            if token is not None and kwargs.get(key) is not None:
                grids[token] = kwargs[key]
        position_ids = kwargs.get("position_ids")
        position_ids = position_ids if isinstance(position_ids, Tensor) and position_ids.dim() == 3 else None
        return TokenRoles.from_input_ids(input_ids, valid, self.token_ids, grids=grids or None, merge=self.merge,
                                         tokens_per_image=self.tokens_per_image, position_ids=position_ids)
