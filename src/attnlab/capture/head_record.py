"""Record head outputs for the ``head_patch`` and ``mean_ablation`` edits (they live in ``attnlab.edits``, which
does not run models): per-head outputs before the output projection, read by :class:`ModelRunner`'s forward
pre-hook on the block's output projection (``o_proj``, ``c_proj``, ...).

```python
from attnlab.capture.head_record import record_head_means, record_head_outputs
source = record_head_outputs(model, corrupted_batch, layers=[5], heads=[1, 3])
patch = EDITS.get("head_patch").from_source(source)            # layers/heads default to the recorded ones
ablate = EDITS.get("mean_ablation").from_means(record_head_means(model, reference_batches), heads=[1])
```
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from attnlab.capture.device_map import input_device
from attnlab.capture.runner import ModelRunner
from attnlab.edits.head_patch import HeadOutputs
from attnlab.capture.inputs import model_batch
from attnlab.errors import ConfigError
from attnlab.params import IndexList, check_indices


def _batch(inputs: Any, device: torch.device) -> dict[str, Tensor]:
    """``input_ids`` and a long ``attention_mask`` of ``inputs`` (:func:`attnlab.capture.inputs.model_batch`)."""
    batch = model_batch(inputs, device)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def record_head_outputs(model: Any, source_inputs: Any, layers: IndexList | None = None,
                        heads: IndexList | None = None, *, edits: Sequence[Any] = ()) -> HeadOutputs:
    """Run ``model`` once on ``source_inputs`` and keep the selected heads' outputs before the output projection.

    Args:
        model: a transformers model whose blocks :class:`ModelRunner` reads (Llama-, BERT-, OPT-, GPT-NeoX-, GPT-2-
            style and the others listed in ``attnlab.capture.runner.OUTPUT_PROJECTIONS``).
        source_inputs: input_ids (seq_len,) or (batch, seq_len) (a tensor or lists of ids), or a batch dict with
            ``input_ids`` and optionally ``attention_mask`` (1 = real token); see
            :func:`attnlab.capture.inputs.model_batch`.
        layers, heads: what to record (None = every layer / query head).
        edits: edits (instances or specs) to run the source pass under.

    Returns:
        :class:`attnlab.edits.head_patch.HeadOutputs`: per layer (batch, len(heads), seq_len, head_dim) in the
        model's dtype, and the source's (batch, seq_len) bool valid mask.

    Raises:
        ConfigError: a layer or head the model does not have (``"heads must be in 0..3, got 7"``); inputs that are
            not token ids.
        UnsupportedModelError: the blocks' output projection is not found.
    """
    runner = ModelRunner(model)
    chosen = check_indices("layers", layers, runner.facts.num_layers)
    head_list = list(check_indices("heads", heads, runner.facts.num_heads))
    batch = _batch(source_inputs, input_device(model))
    record = runner.forward(batch, head_outputs=True, edits=edits)
    outputs = {layer: record.head_outputs[layer][:, :, head_list].transpose(1, 2).contiguous() for layer in chosen}
    return HeadOutputs(outputs=outputs, heads=tuple(head_list), valid=batch["attention_mask"].bool())


def record_head_means(model: Any, batches: Iterable[Any], layers: IndexList | None = None, *,
                      edits: Sequence[Any] = ()) -> dict[int, Tensor]:
    """Mean head output before the output projection over every real token of ``batches`` (a reference text).

    Args:
        model: as :func:`record_head_outputs`.
        batches: an iterable of inputs, each as ``source_inputs`` of :func:`record_head_outputs` (e.g. the windows
            of :func:`attnlab.text.load_text`), or one (batch, seq_len) id tensor.
        layers: layers to record (None = every layer). edits: edits to run the passes under.

    Returns:
        {layer: (num_heads, head_dim) float32} on the model's device; every position of every real token weighs
        the same (padding is left out).

    Raises:
        ConfigError: no real token in ``batches``; bad layers or inputs as in :func:`record_head_outputs`.
    """
    runner = ModelRunner(model)
    chosen = check_indices("layers", layers, runner.facts.num_layers)
    device = input_device(model)
    if isinstance(batches, (Tensor, dict)) or hasattr(batches, "keys"):
        batches = [batches]
    sums: dict[int, Tensor] = {}
    count = 0
    for inputs in batches:
        batch = _batch(inputs, device)
        record = runner.forward(batch, head_outputs=True, edits=edits)
        real = batch["attention_mask"].bool()
        count += int(real.sum())
        for layer in chosen:
            outputs = record.head_outputs[layer]  # on the layer's device (layers may differ under a device map)
            total = outputs[real.to(outputs.device)].double().sum(dim=0)  # (num_heads, head_dim)
            sums[layer] = total if layer not in sums else sums[layer] + total
    if count == 0:
        raise ConfigError("record_head_means: the batches hold no real token")
    return {layer: (total / count).float() for layer, total in sums.items()}
