"""``suppress_keys``: add a bias (default −∞: remove) to chosen text keys' logits, e.g. RefAM's global sinks."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit
from attnlab.errors import ConfigError
from attnlab.params import IndexList, Range, validated
from attnlab.roles import TEXT, RoleList


@EDITS.register("suppress_keys")
class SuppressKeys(Edit):
    """Add ``bias`` to the pre-softmax logits of chosen text keys (None = −∞: those keys get probability 0).

    Kukleva et al. 2025, RefAM (METHODS.md #16, low confidence): global attention sinks (text tokens that draw high
    attention from every image token) "can be safely suppressed"; with :func:`attnlab.probes.refam_maps.detect_gas`
    picking the tokens, this edit is that suppression (and ``bias < 0`` a softer form). Keys are chosen **by index
    among the text tokens** of each call (``tokens=0+5``: the first and sixth text token, in caption order), found
    with the call's key roles; on a model without roles every real key counts as text. Acts on calls that have
    text keys (cross and joint attention); self-attention over patches has none and is left unchanged. A row whose
    visible keys would all be removed raises ConfigError (its softmax has no mass left). Runs on the eager path
    (``-inf`` has no fast form here); ``bias=0`` is the identity.

    Args:
        tokens: text token indices (IndexList, e.g. ``0+3-5``); required unless ``bias=0``.
        bias: a finite logit offset ≤ 0, or None (text ``none``, the default) for −∞.
        layers, heads, queries: the usual selection (``keys=`` is implied: text).

    Raises:
        ConfigError: bias > 0 (boost edits live elsewhere), no tokens with a non-zero bias, or every visible key
            of a row removed.
    """

    stage = "logits"
    identity: ClassVar[dict[str, Any]] = {"bias": 0.0}

    @validated
    def __init__(self, tokens: IndexList | None = None, bias: Annotated[float, Range(le=0.0)] | None = None,
                 layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries)
        if tokens is None and bias != 0.0:
            raise ConfigError("edit 'suppress_keys' needs tokens= (text token indices, e.g. tokens=0+5); only the "
                              "identity bias=0 may leave them out")
        self.tokens, self.bias = tokens, bias

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.tokens is None else {"tokens": self.tokens}
        out["bias"] = "none" if self.bias is None else self.bias
        return out

    def chosen_keys(self, call: AttentionCall) -> Tensor:
        """(B, Lk) bool: the keys that are the ``tokens``-th text tokens of each sequence."""
        text = call.key_valid.bool() if call.key_roles is None else (call.key_roles == TEXT).to(call.key_valid.device)
        rank = text.long().cumsum(dim=-1) - 1  # (B, Lk): index among the text keys
        wanted = torch.tensor(list(self.tokens or ()), dtype=torch.long, device=rank.device)
        return text & torch.isin(rank, wanted)

    def logits_mod(self, logits: Tensor, q_index: Tensor, call: AttentionCall) -> Tensor:
        width = logits.shape[-1]
        chosen = self.chosen_keys(call)[:, None, None, :width]  # (B, 1, 1, w)
        where = self.selection(call, q_index, width) & chosen  # (B, Hq, n, w)
        if self.bias is not None:
            return logits + where.to(logits.dtype) * self.bias
        out = logits.masked_fill(where, float("-inf"))
        if bool((torch.isinf(out) & (out < 0)).all(dim=-1).logical_and(~torch.isinf(logits).all(dim=-1)).any()):
            raise ConfigError(f"suppress_keys tokens={list(self.tokens)} removes every visible key of some query rows "
                              f"in layer {call.layer_idx}; keep at least one text token, or use a finite bias")
        return out
