"""A :class:`ModelRunner` whose ``forward`` passes every batch entry to the model (pixel values, image grids).

``ModelRunner.forward`` gives the model only ``input_ids`` and ``attention_mask``; a vision-language model also
needs ``pixel_values`` (and, per family, ``image_sizes``, ``image_grid_thw``, ``pixel_attention_mask``). Until
the runner itself forwards them, :class:`VisionRunner` adds the other entries through a forward pre-hook for the
one call. Keys only analyses read (``answer_mask``) are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from attnlab.analyses.base import ForwardRecord
from attnlab.capture.runner import ModelRunner

ANALYSIS_ONLY = ("answer_mask",)


class VisionRunner(ModelRunner):
    """ModelRunner for vision-language models: ``forward`` passes the batch's image inputs on (see module doc)."""

    def forward(self, batch: dict[str, Tensor], *, head_outputs: bool = False, gradients: bool = False,
                head_scale: dict[int, Tensor] | None = None, first_key: dict[int, Tensor] | None = None,
                edits: Sequence[Any] = ()) -> ForwardRecord:
        extra = {key: value for key, value in batch.items()
                 if key not in ("input_ids", "attention_mask", *ANALYSIS_ONLY)}
        text = {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch}
        if not extra:
            return super().forward(text, head_outputs=head_outputs, gradients=gradients, head_scale=head_scale,
                                   first_key=first_key, edits=edits)

        def add_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, **extra}

        handle = self.model.register_forward_pre_hook(add_inputs, with_kwargs=True, prepend=True)
        try:
            return super().forward(text, head_outputs=head_outputs, gradients=gradients, head_scale=head_scale,
                                   first_key=first_key, edits=edits)
        finally:
            handle.remove()

    def attention_probs(self, batch: dict[str, Tensor], *, with_values: bool = False) -> Any:
        """As ModelRunner's, with the analysis-only keys left out of the model call."""
        return super().attention_probs({k: v for k, v in batch.items() if k not in ANALYSIS_ONLY},
                                       with_values=with_values)
