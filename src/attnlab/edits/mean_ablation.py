"""``mean_ablation``: replace selected heads' outputs by a mean head output (a call mean or recorded means)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits.base import AttentionCall, Edit
from attnlab.errors import ConfigError
from attnlab.functional.attention import BlockView
from attnlab.roles import RoleList
from attnlab.params import IndexList, Range, validated

Source = Literal["batch", "sequence", "recorded"]
PYTHON_ONLY = ("mean_ablation:source=recorded needs recorded means; use the Python API: "
               "attnlab.edits.mean_ablation.MeanAblation.from_means(attnlab.record_head_means(model, batches), "
               "heads=[...])")


@EDITS.register("mean_ablation")
class MeanAblation(Edit):
    """Selected heads' outputs → a mean head output (over the batch, each sequence, or recorded in Python).

    Each selected head's output before o_proj, at every real query position, becomes
    ``(1-fraction)·o + fraction·mean`` (``fraction=1``, the default, replaces it by the mean).

    Mean-ablation, as in circuit analysis (e.g. Wang et al. 2022, IOI), removes what a head says about *this* input
    while keeping its average contribution, unlike ``head_scale:scale=0``, which also removes the average (a bias the
    next layers expect). The mean is one of:

    - ``source=recorded``: per-layer means over a reference text, ``{layer: (num_heads, head_dim)}`` from
      :func:`attnlab.capture.head_record.record_head_means`, given with :meth:`from_means` (Python only). The
      standard form: nothing of the current input leaks into the mean.
    - ``source=batch`` (the default, and the form the CLI can build): the mean over every real query position of every
      sequence of the current attention call, i.e. the batch serves as the reference distribution.
    - ``source=sequence``: the mean over each sequence's own real query positions (a padded batch then gives the same
      per-sequence result as one sequence at a time; with ``batch`` it depends on what else is in the batch).

    The call means (batch, sequence) are the mean of the head's attention output after the logits/probs edits and
    before any output edit, computed in one extra pass of the blocked kernel per call (as ``calibration``). They
    include later positions of the text, so at position t the mean carries (diluted) information about tokens
    after t: for a next-token evaluation prefer recorded means of other text.

    Under a KV cache (``generate``, greedy decoding with ``use_cache=True``) a decode step's call holds only the new
    query rows (q_len < kv_len), whose own mean would be the row itself: such a call reuses the mean of the last call
    of the same layer that held the whole sequence (q_len = kv_len, the prefill), i.e. the mean over the prompt.
    A cached call with no such call before it in the session is refused (ConfigError).

    Args:
        fraction: in [0, 1]; 0 is the identity. source: see above ("recorded" needs :meth:`from_means`).
        layers, heads: selection (query heads; on a GQA model only the query heads named).

    Raises:
        ConfigError: fraction outside [0, 1]; ``source=recorded`` without means (when the session starts); means
            missing for a selected layer or of the wrong shape; a cached call (q_len < kv_len) of a call mean with
            no prefill of the same layer and batch size before it in the session.
    """

    stage = "output"
    fast = True

    identity: ClassVar[dict[str, Any]] = {"fraction": 0.0}

    @validated
    def __init__(self, fraction: Annotated[float, Range(ge=0.0, le=1.0)] = 1.0, source: Source = "batch",
                 layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        self.fraction, self.source = fraction, source
        self.means: dict[int, Tensor] | None = None
        self._call_mean: Tensor | None = None
        self._prefill_means: dict[int, Tensor] = {}  # layer -> the call mean of its last whole-sequence call

    def reset(self) -> None:
        super().reset()
        self._call_mean, self._prefill_means = None, {}

    @property
    def needs_prepare(self) -> bool:  # type: ignore[override]  # the call means need one pass over the probs
        return self.source != "recorded" and self.fraction != 0.0

    @classmethod
    def from_means(cls, means: Mapping[int, Tensor], *, layers: IndexList | None = None,
                   heads: IndexList | None = None, fraction: float = 1.0) -> MeanAblation:
        """The edit with recorded means.

        Args:
            means: {layer: (num_heads, head_dim) float} mean head outputs, e.g. from
                :func:`attnlab.capture.head_record.record_head_means`.
            layers: the layers to ablate (default: every layer of ``means``). heads: query heads (default all).
            fraction: as in the class.

        Raises:
            ConfigError: a mean that is not 2-D, or a selected layer without a mean.
        """
        chosen = sorted(int(layer) for layer in means) if layers is None else layers
        edit = cls(fraction=fraction, source="recorded", layers=chosen, heads=heads)
        edit.means = {}
        for layer, mean in means.items():
            mean = torch.as_tensor(mean).detach()
            if mean.dim() != 2:
                raise ConfigError(f"mean_ablation: the mean of layer {layer} must be (num_heads, head_dim), got "
                                  f"shape {tuple(mean.shape)}")
            edit.means[int(layer)] = mean
        edit._check_recorded(edit.layers or ())
        return edit

    def _check_recorded(self, layers: Any) -> None:
        """ConfigError naming the layers of ``layers`` that have no recorded mean."""
        missing = sorted(set(layers) - set(self.means or {}))
        if missing:
            raise ConfigError(f"mean_ablation: no recorded mean for layer(s) {missing}; recorded: "
                              f"{sorted(self.means or {})}")

    def params(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "source": self.source}

    def check_model(self, num_layers: int, num_heads: int) -> None:
        super().check_model(num_layers, num_heads)
        if self.source != "recorded" or self.fraction == 0.0:
            return
        if self.means is None:
            raise ConfigError(PYTHON_ONLY)
        layers = range(num_layers) if self.layers is None else self.layers
        self._check_recorded(layers)
        wrong = {layer: tuple(self.means[layer].shape) for layer in layers if self.means[layer].shape[0] != num_heads}
        if wrong:
            raise ConfigError(f"mean_ablation: recorded means must have num_heads={num_heads} rows, got {wrong}")

    # the call mean ----------------------------------------------------------------------------------------------
    def prepare(self, call: AttentionCall, probs_pass: Any) -> None:
        """The mean head output over the call's real queries (per sequence or over the batch) → kept for output;
        a cached call (q_len < kv_len) takes the mean of its layer's last whole-sequence call instead."""
        B, Hq, device = call.batch, call.num_heads, call.device
        if call.q_len < call.kv_len:
            self._call_mean = self._prefill_mean(call)
            return
        value = call.value.repeat_interleave(call.num_kv_groups, dim=1).double()  # (B, Hq, Lk, Dv)
        total = torch.zeros(B, Hq, value.shape[-1], dtype=torch.float64, device=device)

        def collect(block: BlockView) -> None:
            width = block.probs.shape[-1]
            rows = torch.einsum("bhnk,bhkd->bhnd", block.probs.double(), value[:, :, :width].to(block.probs.device))
            real = call.query_valid[:, block.q_index.to(device)][:, None, :, None].to(rows.device)
            total.add_(torch.where(real, rows, 0.0).sum(dim=2).to(device))

        probs_pass(collect)
        count = call.query_valid.sum(dim=1).double().view(B, 1, 1)
        if self.source == "batch":
            total, count = total.sum(dim=0, keepdim=True), count.sum(dim=0, keepdim=True)
        self._call_mean = (total / count.clamp(min=1.0))[:, :, None, :]  # (B|1, Hq, 1, Dv)
        self._prefill_means[call.layer_idx] = self._call_mean

    def _prefill_mean(self, call: AttentionCall) -> Tensor:
        mean = self._prefill_means.get(call.layer_idx)
        if mean is None:
            raise ConfigError(f"mean_ablation:source={self.source} needs the whole sequence in one call first: layer "
                              f"{call.layer_idx}'s call has q_len {call.q_len} < kv_len {call.kv_len} (a KV cache) "
                              f"and no prefill of it ran in this session; run the prompt inside the session or use "
                              f"source=recorded")
        if self.source == "sequence" and mean.shape[0] != call.batch:
            raise ConfigError(f"mean_ablation:source=sequence: layer {call.layer_idx}'s cached call has batch "
                              f"{call.batch}, its prefill had batch {mean.shape[0]}")
        return mean

    def _mean(self, call: AttentionCall) -> Tensor:
        if self.source != "recorded":
            if self._call_mean is None:
                raise RuntimeError("mean_ablation.output_mod called before prepare()")  # internal invariant
            return self._call_mean
        if self.means is None:
            raise ConfigError(PYTHON_ONLY)
        mean = self.means.get(call.layer_idx)
        if mean is None or mean.shape[0] != call.num_heads:
            raise ConfigError(f"mean_ablation: no recorded (num_heads={call.num_heads}, head_dim) mean for layer "
                              f"{call.layer_idx}")
        return mean[None, :, None, :]  # (1, Hq, 1, Dv)

    def output_mod(self, output: Tensor, call: AttentionCall) -> Tensor:
        return self.output_mod_at(output, None, call)

    def output_mod_at(self, output: Tensor, q_index: Tensor | None, call: AttentionCall) -> Tensor:
        if self.fraction == 0.0:
            return output
        mean = self._mean(call).to(device=output.device, dtype=output.dtype)
        if mean.shape[-1] != output.shape[-1]:
            raise ConfigError(f"mean_ablation: the mean has head_dim {mean.shape[-1]}, layer {call.layer_idx}'s "
                              f"heads have {output.shape[-1]}")
        mixed = mean.expand_as(output) if self.fraction == 1.0 else (1 - self.fraction) * output + self.fraction * mean
        valid = call.query_valid if q_index is None else call.query_valid[:, q_index.to(call.query_valid.device)]
        select = self.head_column(call).to(output.device) & valid[:, None, :, None].to(output.device)
        return torch.where(select, mixed, output)
