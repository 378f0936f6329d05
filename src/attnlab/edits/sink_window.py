"""``sink_window``: StreamingLLM-style attention — the first ``sinks`` tokens plus a recent window of keys."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit, evaluate_mask_mod
from attnlab.functional.masks import MASKS
from attnlab.roles import RoleList
from attnlab.params import IndexList, Range, validated


@EDITS.register("sink_window")
class SinkWindow(Edit):
    """Keep only the first ``sinks`` tokens and the last ``window`` keys (itself included) of every query.

    Xiao et al. 2024 (StreamingLLM), as applied by SinkLoRA (METHODS.md #30): a query at position q sees key k iff
    ``k < sinks`` or ``0 <= q - k < window`` (the convention of the ``sink_window`` mask, docs/masks.md), so at
    most ``sinks + window`` keys; ``sinks=4, window=252`` keeps 256. This edit is the *prefill mask*: positions
    are the original token positions. For generation, :class:`attnlab.capture.cache.SinkWindowCache` is the
    KV-cache policy (keys stored before RoPE and re-rotated to their in-cache positions, optionally H2O eviction).
    Runs on the fast path (a boolean mask in SDPA).

    Args:
        sinks: number of initial tokens always visible (≥ 0). window: recent keys visible (≥ 1).
        layers, heads: selection (query heads).

    Raises:
        ConfigError: sinks < 0 or window < 1.
    """

    stage = "mask"
    fast = True

    identity: ClassVar[None] = None  # no identity form: any window shorter than the sequence drops keys

    @validated
    def __init__(self, sinks: Annotated[int, Range(ge=0)] = 4, window: Annotated[int, Range(ge=1)] = 252,
                 layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        self.sinks, self.window = sinks, window
        self._mask_mod = MASKS.get("sink_window")(num_sink_tokens=self.sinks, window=self.window)

    def params(self) -> dict[str, Any]:
        return {"sinks": self.sinks, "window": self.window}

    def keep_mod(self, keep: Tensor, call: AttentionCall) -> Tensor:
        return keep & evaluate_mask_mod(self._mask_mod, call)
