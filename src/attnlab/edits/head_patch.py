"""``head_patch``: replace selected heads' outputs by the outputs the same heads gave on another input."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit
from attnlab.errors import ConfigError
from attnlab.roles import RoleList
from attnlab.params import IndexList, Range, validated

PYTHON_ONLY = ("head_patch needs recorded head outputs; use the Python API: "
               "attnlab.edits.head_patch.HeadPatch.from_source(attnlab.record_head_outputs(model, source_inputs, "
               "layers=[...], heads=[...]))")


@dataclass(frozen=True)
class HeadOutputs:
    """Head outputs recorded on a source input (:func:`attnlab.capture.head_record.record_head_outputs`).

    Attributes:
        outputs: {layer: (batch, len(heads), q_len, head_dim)} per-head outputs before the output projection, in
            the model's dtype, on the device they were recorded on.
        heads: the recorded query heads (model head indices), in the order of the outputs' head axis.
        valid: (batch, q_len) bool, the source's real tokens (its attention mask).
    """

    outputs: dict[int, Tensor]
    heads: tuple[int, ...]
    valid: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(batch, q_len) of the source."""
        return int(self.valid.shape[0]), int(self.valid.shape[1])

    def __repr__(self) -> str:
        """A short summary (no tensor values): batch, q_len, layers, heads, real tokens."""
        batch, q_len = self.shape
        return (f"HeadOutputs(batch={batch}, q_len={q_len}, layers={sorted(self.outputs)}, heads={list(self.heads)}, "
                f"real_tokens={int(self.valid.sum())})")


@EDITS.register("head_patch")
class HeadPatch(Edit):
    """Selected heads' outputs → their outputs on a recorded source input (activation patching; Python API).

    Each selected head's output before o_proj, at every real query position, becomes
    ``(1-fraction)·o + fraction·o_source``, where ``o_source`` is the same head's output at the same position index
    on a recorded source input (``fraction=1``, the default, replaces it).

    This is the head-level "patching from another input" of circuit analysis (run on a clean input with heads
    taken from a corrupted one, or the reverse). Positions are aligned by index: the source must have the same
    batch size and q_len as each patched attention call, and every real query of the call must be a real token of
    the source (left-pad both the same way). Rows that are padding in the patched call are left alone.

    The source is Python-only state (:meth:`from_source` / :meth:`with_source`); a spec string (``--edit
    head_patch``) builds the edit without one, which a session refuses before anything runs unless
    ``fraction=0`` (the identity, which needs no source).

    Args:
        fraction: in [0, 1]; 0 is the identity. layers, heads: selection (query heads; each must be recorded).

    Raises:
        ConfigError: fraction outside [0, 1]; no source, or a selected layer/head the source did not record (when the
            session starts); a call whose (batch, q_len) differs from the source's, or a real query on a source
            padding position.
    """

    stage = "output"
    fast = True

    identity: ClassVar[dict[str, Any]] = {"fraction": 0.0}

    @validated
    def __init__(self, fraction: Annotated[float, Range(ge=0.0, le=1.0)] = 1.0, layers: IndexList | None = None,
                 heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        self.fraction = fraction
        self.source: HeadOutputs | None = None

    def params(self) -> dict[str, Any]:
        return {"fraction": self.fraction}

    @classmethod
    def from_source(cls, source: HeadOutputs, *, layers: IndexList | None = None, heads: IndexList | None = None,
                    fraction: float = 1.0) -> HeadPatch:
        """The edit patching from ``source``; ``layers``/``heads`` default to the recorded ones.

        Raises:
            ConfigError: a layer or head the source did not record; fraction outside [0, 1].
        """
        chosen_layers = sorted(source.outputs) if layers is None else layers
        chosen_heads = list(source.heads) if heads is None else heads
        return cls(fraction=fraction, layers=chosen_layers, heads=chosen_heads).with_source(source)

    def with_source(self, source: HeadOutputs) -> HeadPatch:
        """A copy of this edit that patches from ``source``.

        Raises:
            ConfigError: ``source`` is not HeadOutputs, or this edit selects a layer or head it did not record
                (``layers``/``heads`` None = every layer/head must be recorded; checked against the model when the
                session starts).
        """
        if not isinstance(source, HeadOutputs):
            raise ConfigError(f"head_patch: the source must be HeadOutputs (attnlab.record_head_outputs), got "
                              f"{type(source).__name__}")
        if self.layers is not None:
            missing = sorted(set(self.layers) - set(source.outputs))
            if missing:
                raise ConfigError(f"head_patch: layer(s) {missing} were not recorded; recorded: "
                                  f"{sorted(source.outputs)}")
        if self.heads is not None:
            missing = sorted(set(self.heads) - set(source.heads))
            if missing:
                raise ConfigError(f"head_patch: head(s) {missing} were not recorded; recorded: {list(source.heads)}")
        edit = copy.copy(self)
        edit.reset()
        edit.source = source
        return edit

    def check_model(self, num_layers: int, num_heads: int) -> None:
        super().check_model(num_layers, num_heads)
        if self.fraction == 0.0:
            return
        if self.source is None:
            raise ConfigError(PYTHON_ONLY)
        layers = range(num_layers) if self.layers is None else self.layers
        missing = sorted(set(layers) - set(self.source.outputs))
        if missing:
            raise ConfigError(f"head_patch: layer(s) {missing} were not recorded; recorded: "
                              f"{sorted(self.source.outputs)} (pass layers=...)")
        heads = range(num_heads) if self.heads is None else self.heads
        absent = sorted(set(heads) - set(self.source.heads))
        if absent:
            raise ConfigError(f"head_patch: head(s) {absent} were not recorded; recorded: {list(self.source.heads)} "
                              f"(pass heads=...)")

    def _source_rows(self, call: AttentionCall, q_index: Tensor | None) -> tuple[list[int], Tensor]:
        """The selected heads and their source outputs (B, n_sel, n, Dv) for the call's rows ``q_index``."""
        if self.source is None:
            raise ConfigError(PYTHON_ONLY)
        recorded = self.source.outputs.get(call.layer_idx)
        if recorded is None:
            raise ConfigError(f"head_patch: layer {call.layer_idx} was not recorded; recorded: "
                              f"{sorted(self.source.outputs)}")
        batch, q_len = self.source.shape
        if (batch, q_len) != (call.batch, call.q_len):
            raise ConfigError(f"head_patch: the source has batch {batch} and q_len {q_len}, layer {call.layer_idx}'s "
                              f"attention call has batch {call.batch} and q_len {call.q_len}; positions are aligned "
                              f"by index, so both must match")
        rows = torch.arange(call.q_len) if q_index is None else q_index.cpu()
        source_valid = self.source.valid.to(call.query_valid.device)[:, rows.to(call.query_valid.device)]
        stray = call.query_valid[:, rows.to(call.query_valid.device)] & ~source_valid
        if bool(stray.any()):
            raise ConfigError(f"head_patch: {int(stray.sum())} real query position(s) of layer {call.layer_idx}'s call "
                              f"are padding in the source; pad the source like the patched input")
        selected = self.head_mask(call).nonzero().flatten().tolist()
        try:
            index = [self.source.heads.index(h) for h in selected]
        except ValueError:
            raise ConfigError(f"head_patch: heads {selected} are not all recorded "
                              f"({list(self.source.heads)})") from None
        picked = recorded[:, index] if q_index is None else recorded[:, index][:, :, rows.to(recorded.device)]
        return selected, picked

    def output_mod(self, output: Tensor, call: AttentionCall) -> Tensor:
        return self.output_mod_at(output, None, call)

    def output_mod_at(self, output: Tensor, q_index: Tensor | None, call: AttentionCall) -> Tensor:
        if self.fraction == 0.0:
            return output
        heads, source = self._source_rows(call, q_index)
        source = source.to(device=output.device, dtype=output.dtype)
        if source.shape[-1] != output.shape[-1]:
            raise ConfigError(f"head_patch: the source has head_dim {source.shape[-1]}, layer {call.layer_idx}'s "
                              f"heads have {output.shape[-1]}")
        current = output[:, heads]
        mixed = source if self.fraction == 1.0 else (1 - self.fraction) * current + self.fraction * source
        valid = call.query_valid if q_index is None else call.query_valid[:, q_index.to(call.query_valid.device)]
        patched = output.clone()
        patched[:, heads] = torch.where(valid[:, None, :, None].to(output.device), mixed, current)
        return patched
