"""``mask``: any registered mask (``attnlab ls masks``) applied to a pretrained model's attention."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar

from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit, evaluate_mask_mod
from attnlab.functional.masks import MASKS
from attnlab.roles import RoleList
from attnlab.params import Forward, IndexList, validated


def _factory(arguments: Mapping[str, Any]) -> Callable[..., Any]:
    """The mask factory the ``name`` argument selects; its annotations type the edit's extra keys."""
    return MASKS.get(arguments["name"])


@EDITS.register("mask")
class Mask(Edit):
    """AND a registered mask_mod (``name=…`` plus its parameters) into the model's mask, e.g. ``mask:name=ls_heads``.

    The mask_mod is evaluated on token positions (real-token positions: left padding does not shift the pattern)
    and on query-head indices; see docs/masks.md for each mask's definition. Runs on the fast path.

    Args:
        name: a name from ``attnlab ls masks`` (``full`` is the identity). Other keyword arguments go to that mask's
            factory, typed by its annotations (``mask:name=sliding_window,window=3``).
        layers, heads: selection (query heads).

    Raises:
        RegistryError: unknown mask name. ConfigError: a parameter the factory does not take, or a bad value.
    """

    stage = "mask"
    fast = True

    identity: ClassVar[dict[str, Any]] = {"name": "full"}

    @validated
    def __init__(self, name: str = "causal", layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None,
                 **mask_params: Annotated[Any, Forward(_factory, "mask")]) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        self._mask_mod = MASKS.get(name)(**mask_params)
        self.mask_name, self.mask_params = name, dict(mask_params)

    def params(self) -> dict[str, Any]:
        return {"name": self.mask_name, **self.mask_params}

    def keep_mod(self, keep: Tensor, call: AttentionCall) -> Tensor:
        return keep & evaluate_mask_mod(self._mask_mod, call)
