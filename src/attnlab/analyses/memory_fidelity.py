"""Memory fidelity of recurrent (decaying linear-attention) layers (Wang et al. 2025, MemMamba, METHODS.md #15).

Low confidence: MemMamba defines ETMF/ECLMF in words only; the estimators are those of :mod:`attnlab.stats.memory`
(horizontal: a token's value read back from the state k steps later with its own key, as retention ⟨r, v⟩/‖v‖²
and as cosine; vertical: cosine between a token's inputs to two recurrent layers). The analysis measures the layers
whose recurrence inputs :func:`layer_keys_values` rebuilds exactly (the state it builds equals the layer's own
final state): RetNet retention (keys rotated by ``rope_base``) and Lightning attention (SiLU on keys and values,
LRPE-d on keys when ``use_lrpe``). Other layers, even with a ``log_decay`` buffer (ALiBi is softmax attention),
are not recurrent_layers, and ``observe_layer`` raises ConfigError on them. A model without such a layer (every
bundled model) is skipped with a warning and an explanation in the extras, and produces no rows.
``observe_layer(module, hidden_states)`` measures one layer directly.

Rows: ``retention`` and ``fidelity`` (layer = index among the recurrent layers, head, position = lag k), and
``vertical_fidelity`` (layer = l, position = l', l < l').
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import torch
from torch import Tensor, nn

from attnlab.analyses import ANALYSES
from attnlab.analyses.base import Analysis, Runner
from attnlab.errors import ConfigError
from attnlab.facts import ModelFacts
from attnlab.params import Range, validated
from attnlab.probes.base import Row, RowWriter
from attnlab.report.sections import PositionCurve, Section, Series, Text
from attnlab.stats.memory import horizontal_fidelity, vertical_fidelity

logger = logging.getLogger(__name__)

SKIP_MESSAGE = ("memory_fidelity skipped: the model has no recurrent layer from attnlab.layers (retention or "
                "lightning)")


def recurrent_layers(model: nn.Module) -> list[nn.Module]:
    """Modules of ``model`` (itself included) that the analysis can measure, in module order."""
    return [module for module in model.modules() if isinstance(module, _measured_classes())]


# registered layer names (attnlab.layers.LAYERS) whose recurrence inputs layer_keys_values rebuilds
MEASURED_LAYERS = ("retention", "lightning")


def _measured_classes() -> tuple[type, ...]:
    from attnlab.layers import LAYERS

    return tuple(LAYERS.get(name) for name in MEASURED_LAYERS)


def layer_keys_values(module: nn.Module, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
    """(B, H, T, K) keys and (B, H, T, V) values exactly as the layer feeds its recurrence, kv heads expanded.

    Raises ConfigError for a module that is not a retention or lightning layer.
    """
    from attnlab.functional.lightning import lrpe
    from attnlab.layers import LAYERS
    from attnlab.functional.positions import rotary

    if not isinstance(module, _measured_classes()):
        raise ConfigError(f"memory_fidelity cannot rebuild the recurrence inputs of {type(module).__name__}; it "
                          "measures retention and lightning layers")
    H = module.num_heads
    Hkv = getattr(module, "num_kv_heads", H) or H
    B, T, _ = hidden_states.shape
    key = module.k_proj(hidden_states).view(B, T, Hkv, -1).transpose(1, 2)  # (B, Hkv, T, K)
    value = module.v_proj(hidden_states).view(B, T, Hkv, -1).transpose(1, 2)
    if isinstance(module, LAYERS.get("retention")):
        key = rotary(key, 0, module.rope_base)
    else:  # lightning
        key, value = nn.functional.silu(key), nn.functional.silu(value)
        if module.use_lrpe:
            key = lrpe(key, 0)
    return key.repeat_interleave(H // Hkv, dim=1), value.repeat_interleave(H // Hkv, dim=1)


@ANALYSES.register("memory_fidelity")
class MemoryFidelityAnalysis(Analysis):
    """Horizontal (state read-back over k steps) and vertical (across layers) memory fidelity of recurrent layers.

    Args:
        lags: step distances k (default [1, 2, 4, 8, 16, 32]).
    """

    shardable = True

    sections = (Section("probe-memory-fidelity", "Memory fidelity", (
        Text(template="{skipped}", when="skipped"),
        Text(template="Lags {lags}; {layers_measured} recurrent layer(s).", when="retention"),
        PositionCurve((Series("retention", "layer {layer}", layers="each"),), title="state read-back vs lag",
                      xlabel="lag k (steps)", ylabel="retention ⟨r, v⟩/‖v‖²",
                      alt="Retention against lag per recurrent layer", caption="Mean over heads and tokens."),
    )),)

    @validated
    def __init__(self, lags: tuple[Annotated[int, Range(ge=0)], ...] = (1, 2, 4, 8, 16, 32)) -> None:
        if not lags:
            raise ConfigError(f"lags must list integers >= 0, got {lags}")
        self.lags = sorted(set(lags))
        self.results: dict[int, list[Tensor]] = {}
        self.inputs: list[list[Tensor]] = []
        self.skipped: str | None = None

    def prepare(self, facts: ModelFacts, runner: Runner) -> None:
        super().prepare(facts, runner)
        self.results, self.inputs, self.skipped = {}, [], None

    def observe_layer(self, module: nn.Module, hidden_states: Tensor, index: int = 0,
                      valid: Tensor | None = None) -> None:
        """Measure one recurrent layer on its input hidden_states (B, T, C) (right padding via ``valid``).

        Raises ConfigError on left padding (a padded step before a real one would sit inside the state).
        """
        if valid is not None and bool((valid[:, 1:].bool() & ~valid[:, :-1].bool()).any()):
            raise ConfigError("memory_fidelity needs right padding (real tokens first); got left padding")
        with torch.no_grad():
            key, value = layer_keys_values(module, hidden_states)
            retention, fidelity, pairs = horizontal_fidelity(key.cpu(), value.cpu(), module.log_decay.cpu(),
                                                             self.lags, valid)
        sums = self.results.setdefault(index, [torch.zeros_like(retention), torch.zeros_like(fidelity),
                                               torch.zeros_like(pairs)])
        sums[0] += retention * pairs
        sums[1] += fidelity * pairs
        sums[2] += pairs

    def observe(self, runner: Runner, batch: dict[str, Tensor]) -> None:
        mask = batch.get("attention_mask")
        if mask is not None and bool((mask[:, 1:].bool() & ~mask[:, :-1].bool()).any()):
            raise ConfigError("memory_fidelity needs right padding (real tokens first); got left padding")
        layers = recurrent_layers(runner.model)
        if not layers:
            if self.skipped is None:
                logger.warning(SKIP_MESSAGE)
                self.skipped = SKIP_MESSAGE
            return
        captured: dict[int, Tensor] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs, i=i: captured.__setitem__(
            i, kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True) for i, m in enumerate(layers)]
        try:
            with torch.no_grad():
                runner.model(**batch)
        finally:
            for hook in hooks:
                hook.remove()
        valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool().cpu()
        for i, module in enumerate(layers):
            self.observe_layer(module, captured[i], i, valid)
        self.inputs.append([captured[i].detach().cpu() for i in range(len(layers))] + [valid])

    def merge(self, other: Analysis) -> None:
        """Add the other analysis's per-lag sums and append its batches' layer inputs."""
        for index, sums in other.results.items():  # type: ignore[attr-defined]
            mine = self.results.setdefault(index, [torch.zeros_like(s) for s in sums])
            for total, part in zip(mine, sums):
                total += part
        self.inputs.extend(other.inputs)  # type: ignore[attr-defined]
        self.skipped = self.skipped or other.skipped  # type: ignore[attr-defined]

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors ``results.INDEX.{0,1,2}`` (retention, fidelity and pair sums) and ``inputs.BATCH.I`` (the
        captured layer inputs, then the valid mask); side: their indices and sizes, and ``skipped``."""
        tensors = {f"results.{index}.{k}": total for index, sums in self.results.items()
                   for k, total in enumerate(sums)}
        tensors.update({f"inputs.{b}.{i}": t for b, batch in enumerate(self.inputs) for i, t in enumerate(batch)})
        return tensors, {"results": sorted(self.results), "inputs": [len(batch) for batch in self.inputs],
                         "skipped": self.skipped}

    def import_state(self, tensors: dict[str, Tensor], side: dict[str, Any]) -> None:
        self.results = {index: [tensors[f"results.{index}.{k}"].clone() for k in range(3)]
                        for index in side["results"]}
        self.inputs = [[tensors[f"inputs.{b}.{i}"].clone() for i in range(size)]
                       for b, size in enumerate(side["inputs"])]
        self.skipped = side["skipped"]

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        for index, (retention, fidelity, pairs) in sorted(self.results.items()):
            for i, lag in enumerate(self.lags):
                if float(pairs[i]) > 0:
                    ok = torch.ones(retention.shape[0], dtype=torch.bool)
                    out.add_indexed("retention", retention[:, i] / pairs[i], ok, ("head",), layer=index, position=lag)
                    out.add_indexed("fidelity", fidelity[:, i] / pairs[i], ok, ("head",), layer=index, position=lag)
        if self.inputs:
            matrix = torch.stack([vertical_fidelity(b[:-1], b[-1]) for b in self.inputs]).mean(0)  # mean over batches
            for i in range(matrix.shape[0]):
                for j in range(i + 1, matrix.shape[0]):
                    out.add("vertical_fidelity", float(matrix[i, j]), i, None, j)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        return {"lags": self.lags, "layers_measured": len(self.results), "skipped": self.skipped}
