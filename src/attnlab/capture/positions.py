"""Position ids a forward pass gets inside a session: derived from the mask for left padding, then edited.

Two jobs, both in the session's forward pre-hook:
- A model with learned absolute positions (GPT-2, ``facts.position_embedding == "absolute"``) counts positions
  from the first column, padding included, when no ``position_ids`` are given, so a left-padded text gets other
  positions than the same text alone (logits 0.4–0.6 apart on GPT-2). When the model's forward takes
  ``position_ids``, the session passes ``cumsum(attention_mask) - 1`` (clamped at 0) for such batches, as
  transformers' own ``generate`` does; otherwise it logs a warning once. RoPE models are left alone (their
  attention depends only on position differences, and their logits stay bit-identical to a run without attnlab).
- positions-stage edits (``concentric_positions``) remap the ids (built as transformers would if absent). Only edits
  whose :meth:`~attnlab.edits.base.Edit.remaps_positions` is True take part: on a multi-axis RoPE model (M-RoPE,
  Qwen2-VL) those are refused, while a positions-stage edit that leaves the ids alone (``cca:positions=false``, the
  mask only) runs.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.capture.architectures import text_config
from attnlab.capture.calls import past_length
from attnlab.capture.edit_log import EditLog
from attnlab.errors import ConfigError
from attnlab.facts import ModelFacts
from attnlab.probes.base import SequenceInfo

logger = logging.getLogger(__name__)


class PositionIds:
    """The position-ids rule of one session (see the module docstring)."""

    def __init__(self, model: nn.Module, facts: ModelFacts, edit_log: EditLog) -> None:
        try:
            self.accepted = "position_ids" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self.accepted = False
        self.absolute = facts.position_embedding == "absolute"
        self.model_name = type(model).__name__
        self.edit_log = edit_log
        rope = getattr(text_config(model), "rope_parameters", None) or getattr(text_config(model), "rope_scaling", None)
        self.edits = [edit for edit in edit_log.position_edits if edit.remaps_positions()]
        if self.edits and isinstance(rope, dict) and rope.get("mrope_section"):
            raise ConfigError(f"{self.model_name} uses multi-axis RoPE (M-RoPE: time, height, width per image token); "
                              f"positions edits ({', '.join(e.spec() for e in self.edits)}) remap 1-D position ids and "
                              "would flatten it")
        self.warned = False

    def __call__(self, kwargs: dict[str, Any], sequence: SequenceInfo, length: int) -> Tensor | None:
        """Position ids (B, length) long to pass instead of the forward's own, or None to leave it unchanged.

        ``sequence`` covers the forward's 2-D attention mask (past and new tokens); ``length`` new tokens."""
        given = kwargs.get("position_ids")
        position_ids = self._from_mask(kwargs, sequence, length) if given is None and self.absolute else given
        edits = self.edits
        if not edits:
            return None if position_ids is given else position_ids
        if position_ids is None:
            past = past_length(kwargs)
            position_ids = torch.arange(past, past + length, device=sequence.valid.device)
            position_ids = position_ids.expand(sequence.valid.shape[0], length)
        if position_ids.dim() != 2:
            raise ConfigError(f"{self.model_name} passes position ids of shape {tuple(position_ids.shape)} "
                              "(multi-axis RoPE, e.g. Qwen2-VL's M-RoPE); positions edits take (batch, seq_len) ids")
        for edit in edits:
            position_ids = edit.position_ids(position_ids, sequence)
            self.edit_log.forward_pass(edit)
        return position_ids

    def _from_mask(self, kwargs: dict[str, Any], sequence: SequenceInfo, length: int) -> Tensor | None:
        """``cumsum(mask) - 1`` for the new tokens when some real token would otherwise get another position."""
        past = past_length(kwargs)
        if sequence.valid.shape[1] != past + length:
            return None  # the mask does not cover exactly the past and the new tokens: nothing to derive from
        real = sequence.valid[:, past:]
        derived = sequence.positions[:, past:].clamp(min=0)
        default = torch.arange(past, past + length, device=derived.device)
        if bool(((derived == default) | ~real).all()):
            return None  # no left padding: transformers' own positions are right
        if not self.accepted:
            if not self.warned:
                self.warned = True
                logger.warning("%s adds learned absolute positions and got a left-padded batch, but its forward "
                               "takes no position_ids: padded texts get other positions than alone", self.model_name)
            return None
        return derived
