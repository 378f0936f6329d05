"""``vhr``: Vision-aware Head Reinforcement, the head selection VHD's layer-by-layer procedure chose, scaled by α.

He et al. 2025, "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence" (ACL 2025, arXiv
2412.13949; METHODS.md #7, low–medium confidence: abstract + a secondary summary, § not available (abstract
only)). VHR multiplies the outputs of the vision-aware heads (high VHD, :mod:`attnlab.analyses.vhd`) by α before
W_O. Which heads is decided by a calibration pass, :func:`attnlab.analyses.vhd.select_vhr` (``attnlab vlm vhr`` on the
CLI), which returns this edit; its spec (``vhr:alpha=2.0,pairs=0.1+0.3+1.2``) replays the same selection anywhere
an edit spec is taken (``--edit``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit
from attnlab.edits.head_scale import scale_heads
from attnlab.errors import ConfigError
from attnlab.params import Range, validated
from attnlab.roles import RoleList

_PAIR = re.compile(r"(\d{1,6})\.(\d{1,6})")


def parse_pairs(text: str) -> dict[int, tuple[int, ...]]:
    """``"0.1+0.3+1.2"`` (``layer.head`` joined by ``+``) → ``{0: (1, 3), 1: (2,)}``; ``""`` → ``{}``.

    Raises ConfigError (one line) on any other text."""
    selection: dict[int, set[int]] = {}
    for item in (part.strip() for part in text.split("+")) if text.strip() else ():
        match = _PAIR.fullmatch(item)
        if match is None:
            raise ConfigError(f"vhr: pairs must be layer.head items joined by '+' (e.g. 0.1+0.3+1.2), got {text!r}")
        selection.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    return {layer: tuple(sorted(heads)) for layer, heads in sorted(selection.items())}


def format_pairs(selection: Mapping[int, Sequence[int]]) -> str:
    """``{0: [1, 3], 1: [2]}`` → ``"0.1+0.3+1.2"`` (layers and heads sorted; empty layers left out)."""
    return "+".join(f"{layer}.{head}" for layer in sorted(selection) for head in sorted(set(selection[layer])))


@EDITS.register("vhr")
class VHR(Edit):
    """Scale the selected (layer, head) outputs by α before o_proj (VHR; α = 2 in the summarised paper).

    The same operation as ``head_scale`` (its :func:`~attnlab.edits.head_scale.scale_heads`) with a different head
    set per layer. The set comes from
    :func:`attnlab.analyses.vhd.select_vhr` (calibrated on image-text inputs, layer by layer); an edit without
    pairs selects no head (what ``fraction=0`` selects) and changes nothing. α = 1 is the identity.

    Args:
        alpha: the factor in [-1e6, 1e6] (default 2.0).
        pairs: the selected heads as ``layer.head`` items joined by ``+`` (``"0.1+0.3+1.2"``), or None / "" for
            none. From Python, :meth:`from_selection` takes ``{layer: [heads]}``.
        queries: token roles of the query rows to reinforce (``text+generated``), None = every row.

    Attributes:
        chosen: ``{layer: (heads, …)}``, the selection. scores: (num_layers, H) VHD measured by ``select_vhr``
            (only on an edit it returned).

    Raises:
        ConfigError: alpha out of range; pairs not in the ``layer.head+…`` form.
    """

    stage = "output"
    fast = True

    identity: ClassVar[dict[str, Any]] = {"alpha": 1.0}

    @validated
    def __init__(self, alpha: Annotated[float, Range(ge=-1e6, le=1e6)] = 2.0, pairs: str | None = None,
                 queries: RoleList | None = None) -> None:
        self.chosen = parse_pairs(pairs or "")
        layers = tuple(self.chosen) if self.chosen else None
        super().__init__(layers=layers, heads=None, queries=queries)
        self.alpha = alpha

    @classmethod
    def from_selection(cls, selection: Mapping[int, Sequence[int]], alpha: float = 2.0,
                       queries: RoleList | None = None) -> VHR:
        """The edit scaling ``selection`` {layer: [query heads]} by ``alpha`` (on query rows of ``queries`` roles)."""
        return cls(alpha=alpha, pairs=format_pairs(selection), queries=queries)

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "pairs": format_pairs(self.chosen)}

    def spec(self) -> str:
        """``vhr:alpha=A,pairs=L.H+…[,queries=R+…]`` (the layers are the pairs' own, so they are not repeated)."""
        pairs = format_pairs(self.chosen)
        queries = f",queries={'+'.join(self.queries)}" if self.queries is not None else ""
        return f"{self.name}:alpha={self.alpha}" + (f",pairs={pairs}" if pairs else "") + queries

    def is_identity(self) -> bool:
        """α = 1 or no head selected."""
        return self.alpha == 1.0 or not self.chosen

    def applies_to(self, layer_idx: int) -> bool:
        return layer_idx in self.chosen if self.chosen else True

    def check_model(self, num_layers: int, num_heads: int) -> None:
        """ConfigError naming the first pair outside the model."""
        for layer, heads in self.chosen.items():
            if layer >= num_layers or max(heads) >= num_heads:
                raise ConfigError(f"edit {self.spec()!r}: pair {layer}.{max(heads)} is outside the model "
                                  f"({num_layers} layers, {num_heads} heads)")

    def head_mask(self, call: AttentionCall) -> Tensor:
        """(Hq,) bool: the heads selected on this call's layer (none on other layers)."""
        selected = torch.zeros(call.num_heads, dtype=torch.bool, device=call.device)
        heads = [h for h in self.chosen.get(call.layer_idx, ()) if h < call.num_heads]
        if len(heads) != len(self.chosen.get(call.layer_idx, ())):
            raise ConfigError(f"edit {self.spec()!r}: layer {call.layer_idx} has {call.num_heads} heads")
        if heads:
            selected[heads] = True
        return selected

    def output_mod(self, output: Tensor, call: AttentionCall) -> Tensor:
        return scale_heads(output, self.head_column(call), self.alpha)  # head_scale's code, this layer's heads
