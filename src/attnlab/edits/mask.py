"""``mask``: any registered mask (``attnlab ls masks``) applied to a pretrained model's attention."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import Edit, EditContext, evaluate_mask_mod
from attnlab.errors import ConfigError
from attnlab.functional.masks import MASKS


@EDITS.register("mask")
class Mask(Edit):
    """AND a registered mask_mod (``name=…`` plus its parameters) into the model's mask, e.g. ``mask:name=ls_heads``.

    The mask_mod is evaluated on token positions (real-token positions: left padding does not shift the pattern)
    and on query-head indices; see docs/masks.md for each mask's definition. Runs on the fast path.

    Args:
        name: a name from ``attnlab ls masks``. Other keyword arguments go to that mask's factory.
        layers, heads: selection (query heads).

    Raises:
        RegistryError: unknown mask name. ConfigError: bad mask parameters.
    """

    stage = "mask"
    fast = True

    def __init__(self, name: str = "causal", layers: Any = None, heads: Any = None, **mask_params: Any) -> None:
        super().__init__(layers=layers, heads=heads)
        factory = MASKS.get(str(name))
        try:
            self._mask_mod = factory(**mask_params)
        except TypeError as error:
            raise ConfigError(f"edit 'mask': mask {name!r} does not take {sorted(mask_params)} ({error})") from None
        self.mask_name, self.mask_params = str(name), dict(mask_params)

    def params(self) -> dict[str, Any]:
        return {"name": self.mask_name, **self.mask_params}

    def mask_mod(self, keep: Tensor, ctx: EditContext) -> Tensor:
        return keep & evaluate_mask_mod(self._mask_mod, ctx)
