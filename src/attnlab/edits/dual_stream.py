"""``dual_stream``: the "imbalanced attention" fix: amplify selected image tokens, more in visual heads."""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits._vlm import PrefillStore, answer_rows, image_keys, instruction_rows
from attnlab.edits.base import AttentionCall, Edit
from attnlab.functional.attention import BlockView
from attnlab.params import IndexList, Range, validated
from attnlab.roles import RoleList

FIRST_LAYER = 2  # the released scripts' --start-layer


@EDITS.register("dual_stream")
class DualStream(Edit):
    """Image tokens picked by two streams get logit + α_h·|logit| at the answer rows, α_h by head visual sensitivity.

    Dual-stream token selection and head-specific modulation; the sink-like image tokens get ``β_h·|logit|``.

    Arif et al. 2025, "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language
    Model", arXiv 2501.12206, with the released code hasanar1f/llava-hallunication-fix (METHODS.md #41; low
    confidence: the paper body was not read, and attnlab measures on the language model what the code measures
    in the vision tower). Per layer, on the call that holds the prompt:

    1. Selection, per sequence and per image (``call.key_roles`` / ``call.images``), from this layer's attention
       (a probs pass over the call, heads averaged) — the code takes the CLIP tower's CLS attention instead, which
       attnlab does not route:
       - locally informative stream: the ``⌈local_ratio·n⌉`` image tokens with the most attention from the
         instruction (text query rows after the last image), per visible query;
       - spatially significant stream: the ``⌈spatial_ratio·n⌉`` image tokens with the most attention from the
         image's own tokens (column mass per visible image query);
       - sink-like tokens ("bottom"): the instruction-attention outliers ``c_j > Q3 + 1.5·IQR`` over the image;
         they leave the selection and get β instead of α (the code: outliers of the penultimate ViT layer).
    2. Head-specific modulation: head h's visual sensitivity ``w_h`` = its attention mass on the image from the
       instruction rows, divided by the largest over the layer's heads (so w ∈ [0, 1]); ``α_h = α·w_h`` and
       ``β_h = β·w_h``. ``head_modulation=false`` gives every head α and β (the released code).
    3. At the answer rows (each sequence's last prompt token and every generated token, like PAI's last row):
       ``z'_ij = z_ij + α_h·|z_ij|`` on selected tokens, ``z_ij + β_h·|z_ij|`` on sink-like ones (pre-softmax).

    Decode calls reuse the prompt call's selection and weights. Defaults from the released scripts: α = 0.7,
    β = 0.3, local_ratio = 0.25, layers from 2 on; ``spatial_ratio`` = 0.25 is attnlab's choice (the code's function
    default is 0, which turns the stream off; the paper's value was not recovered). α = β = 0 is the identity.
    Runs on the blocked eager path with one extra probs pass per prompt call.

    Args:
        alpha: α ≥ 0 for the selected tokens. beta: β ≥ 0 for the sink-like tokens. local_ratio, spatial_ratio:
        stream sizes as fractions of each image's tokens, in [0, 1]. head_modulation: weight α and β by w_h.
        layers: default every layer from 2 on. heads, queries, keys: selection (query heads, token roles).

    Raises:
        ConfigError: a parameter out of range; a decode call with no prompt call of its layer before it.
    """

    stage = "logits"

    identity: ClassVar[dict[str, Any]] = {"alpha": 0.0, "beta": 0.0}

    @validated
    def __init__(self, alpha: Annotated[float, Range(ge=0.0, le=1e3)] = 0.7,
                 beta: Annotated[float, Range(ge=0.0, le=1e3)] = 0.3,
                 local_ratio: Annotated[float, Range(ge=0.0, le=1.0)] = 0.25,
                 spatial_ratio: Annotated[float, Range(ge=0.0, le=1.0)] = 0.25, head_modulation: bool = True,
                 layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        self.alpha, self.beta = alpha, beta
        self.local_ratio, self.spatial_ratio, self.head_modulation = local_ratio, spatial_ratio, head_modulation
        self._store = PrefillStore("dual_stream")
        self._current: dict[str, Tensor] | None = None

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "local_ratio": self.local_ratio,
                "spatial_ratio": self.spatial_ratio, "head_modulation": self.head_modulation}

    @property
    def needs_prepare(self) -> bool:  # type: ignore[override]  # the selection needs one pass over the probs
        return not self.is_identity()

    def reset(self) -> None:
        super().reset()
        self._store.clear()
        self._current = None

    def applies_to(self, layer_idx: int) -> bool:
        return layer_idx >= FIRST_LAYER if self.layers is None else layer_idx in self.layers

    # selection ------------------------------------------------------------------------------------------------
    def prepare(self, call: AttentionCall, probs_pass: Any) -> None:
        """Selection and head weights from this call's attention (a prompt call), or the stored ones (decode)."""
        instruction = instruction_rows(call)
        if bool(instruction.any()) or call.q_len == call.kv_len:  # a prompt call (maybe with no instruction)
            self._current = self.select(call, probs_pass, instruction)
            self._store.put(call, **self._current)
        elif bool(answer_rows(call).any()):  # a decode call
            self._current = self._store.get(call, ("top", "bottom"), {"top": False, "bottom": False})
        else:
            self._current = None

    def select(self, call: AttentionCall, probs_pass: Any, instruction: Tensor) -> dict[str, Tensor]:
        """``top`` (B, Lk) bool, ``bottom`` (B, Lk) bool, ``weight`` (B, Hq) float: the dual-stream selection,
        the sink-like tokens and the heads' visual sensitivity."""
        B, Hq, Lk, device = call.batch, call.num_heads, call.kv_len, call.device
        image = image_keys(call)
        span = self._spans(call)  # (B, Lk) image index of each column, -1 off images
        q_span = span[:, Lk - call.q_len:].masked_fill(~call.query_valid, -1)
        from_text, from_image = (torch.zeros(B, Lk, dtype=torch.float64, device=device) for _ in range(2))
        text_seen, image_seen = (torch.zeros(B, Lk, device=device) for _ in range(2))  # visible queries per key
        head_mass = torch.zeros(B, Hq, dtype=torch.float64, device=device)

        def collect(block: BlockView) -> None:
            width, rows = block.probs.shape[-1], block.q_index.to(device)
            probs = block.probs.double().to(device)  # (B, Hq, n, w)
            mean = probs.mean(dim=1)  # (B, n, w), heads averaged
            visible = torch.ones_like(mean, dtype=torch.bool) if block.keep is None else block.keep.to(device)[:, 0]
            reads = instruction[:, rows][:, :, None]  # (B, n, 1)
            from_text[:, :width] += (mean * reads).sum(dim=1)
            text_seen[:, :width] += (visible & reads).sum(dim=1)
            rows_span = q_span[:, rows][:, :, None]  # (B, n, 1)
            own_image = (rows_span >= 0) & (rows_span == span[:, None, :width])  # (B, n, w)
            from_image[:, :width] += (mean * own_image).sum(dim=1)
            image_seen[:, :width] += (visible & own_image).sum(dim=1)
            on_image = probs * image[:, None, None, :width] * reads[:, None]
            head_mass.add_(on_image.sum(dim=(2, 3)))

        probs_pass(collect)
        local = from_text / text_seen.clamp(min=1)  # per-query attention from the instruction
        spatial = from_image / image_seen.clamp(min=1)  # per-query attention from the image's own tokens
        top = torch.zeros(B, Lk, dtype=torch.bool, device=device)
        bottom = torch.zeros_like(top)
        for index, image_span in enumerate(call.images):
            b = image_span.sequence
            columns = (span[b] == index).nonzero().flatten()
            if columns.numel() == 0:
                continue
            count = columns.numel()
            scores = local[b, columns]
            streams = [(spatial[b, columns], self.spatial_ratio)] if bool(image_seen[b, columns].any()) else []
            if bool(instruction[b].any()):  # the instruction-driven stream and the outliers need an instruction
                streams.append((scores, self.local_ratio))
                q1, q3 = torch.quantile(scores, torch.tensor([0.25, 0.75], dtype=scores.dtype, device=device))
                bottom[b, columns[scores > q3 + 1.5 * (q3 - q1)]] = True
            for stream, ratio in streams:
                k = math.ceil(ratio * count)
                if k:
                    top[b, columns[stream.topk(k).indices]] = True
        top &= ~bottom
        peak = head_mass.amax(dim=1, keepdim=True)
        weight = torch.where(peak > 0, head_mass / torch.where(peak > 0, peak, 1.0), 0.0)
        return {"top": top, "bottom": bottom, "weight": weight.float()}

    # the edit -------------------------------------------------------------------------------------------------
    def logits_mod(self, logits: Tensor, q_index: Tensor, call: AttentionCall) -> Tensor:
        if self._current is None or self.is_identity():
            return logits
        device, width = logits.device, logits.shape[-1]
        top = self._current["top"][:, :width].to(device)[:, None, None, :]  # (B, 1, 1, w)
        bottom = self._current["bottom"][:, :width].to(device)[:, None, None, :]
        weight = self._current["weight"].to(device) if self.head_modulation else torch.ones(1, 1, device=device)
        weight = weight[:, :, None, None].to(logits.dtype)  # (B|1, Hq|1, 1, 1)
        gain = self.alpha * weight * top + self.beta * weight * bottom
        rows = answer_rows(call)[:, q_index.to(call.device)].to(device)[:, None, :, None]  # (B, 1, n, 1)
        act = rows & self.head_column(call).to(device)
        return torch.where(act, logits + gain * logits.abs(), logits)

    @staticmethod
    def _spans(call: AttentionCall) -> Tensor:
        """(B, Lk) long: index of the image (in ``call.images``) holding each key column, -1 elsewhere
        (:meth:`attnlab.roles.TokenRoles.span_index` over the call's key columns)."""
        roles = call.sequence.roles
        if roles is None or not roles.images:
            return torch.full((call.batch, call.kv_len), -1, dtype=torch.long, device=call.device)
        span = roles.span_index().to(call.device)
        return span[:, span.shape[1] - call.kv_len:]
