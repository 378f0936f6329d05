"""``gift``: Gaze Shift-Guided Cross-modal Fusion Enhancement — amplify salient image tokens and the user query."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits._vlm import PrefillStore, answer_rows, image_keys, instruction_keys, instruction_rows
from attnlab.edits.base import AttentionCall, Edit
from attnlab.functional.attention import BlockView
from attnlab.params import IndexList, Range, validated
from attnlab.roles import RoleList


@EDITS.register("gift")
class Gift(Edit):
    """GIFT: answer rows amplify salient image tokens (gaze shifts while reading the query) and the query tokens.

    The saliency map comes from the positive changes of image attention while the model reads the query ("gaze
    shifts"); at every answer row, attention to salient image tokens and to the query tokens is amplified.

    Qi, Shang, Spiliopoulou, Pappas 2025, "Capturing Gaze Shifts for Guidance: Cross-Modal Fusion Enhancement for
    VLM Hallucination Mitigation", arXiv 2510.22067 (METHODS.md #42; **low confidence, from the abstract only**: no
    released code was found and the paper body was not read; the formulas below are attnlab's reconstruction
    of the abstract's words). Per layer, on the call that holds the prompt:

    1. Gaze shifts: for the instruction rows i_1 < … < i_m of a sequence (text query rows after its last image),
       ``a_k(j)`` = the head-averaged attention of row i_k on image token j (every image of the sequence);
       ``g_j = Σ_{k=2..m} max(0, a_k(j) − a_{k-1}(j))``; the saliency ``S_j = g_j / max_j' g_j'`` (0 when no shift).
       Tokens that only sink attention barely shift, so they get little saliency (the abstract's argument).
    2. Fusion enhancement at the answer rows (each sequence's last prompt token and every generated token):
       ``A'_ij ∝ A_ij·(1 + α·S_j)`` on image tokens, ``A_ij·(1 + β)`` on the instruction tokens, ``A_ij`` elsewhere,
       renormalised to the row's sum (post-softmax).

    Decode calls reuse the prompt call's saliency. Defaults α = 0.5, β = 0.1 and every layer are attnlab's choices
    (the paper's values were not recovered). α = β = 0 is the identity. Runs on the blocked eager path with one
    extra probs pass per prompt call.

    Args:
        alpha: α ≥ 0, the image amplification at saliency 1. beta: β ≥ 0, the query amplification.
        layers, heads, queries: selection (query heads, query roles). There is no ``keys=``: the edit picks its
        own keys (the image and the instruction).

    Raises:
        ConfigError: a parameter out of range or unknown (``keys=``); a decode call with no prompt call of its layer
            before it.
    """

    stage = "probs"

    identity: ClassVar[dict[str, Any]] = {"alpha": 0.0, "beta": 0.0}

    @validated
    def __init__(self, alpha: Annotated[float, Range(ge=0.0, le=1e3)] = 0.5,
                 beta: Annotated[float, Range(ge=0.0, le=1e3)] = 0.1, layers: IndexList | None = None,
                 heads: IndexList | None = None, queries: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries)
        self.alpha, self.beta = alpha, beta
        self._store = PrefillStore("gift")
        self._saliency: Tensor | None = None

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta}

    @property
    def needs_prepare(self) -> bool:  # type: ignore[override]  # the saliency needs one pass over the probs
        return not self.is_identity()

    def reset(self) -> None:
        super().reset()
        self._store.clear()
        self._saliency = None

    # the saliency map -----------------------------------------------------------------------------------------
    def prepare(self, call: AttentionCall, probs_pass: Any) -> None:
        """The saliency (B, Lk) from this call's instruction rows (a prompt call), or the stored one (decode)."""
        instruction = instruction_rows(call)
        if bool(instruction.any()) or call.q_len == call.kv_len:
            self._saliency = self.saliency(call, probs_pass, instruction)
            self._store.put(call, saliency=self._saliency)
        elif bool(answer_rows(call).any()):
            self._saliency = self._store.get(call, ("saliency",), {"saliency": 0.0})["saliency"]
        else:
            self._saliency = None

    def saliency(self, call: AttentionCall, probs_pass: Any, instruction: Tensor) -> Tensor:
        """(B, Lk) float in [0, 1]: normalised accumulated positive changes of image attention over the
        instruction rows, 0 off the image."""
        B, Lk, device = call.batch, call.kv_len, call.device
        image = image_keys(call)
        slot = instruction.long().cumsum(dim=1) - 1  # (B, Lq): each instruction row's rank in its sequence
        readers = torch.zeros(B, max(int(instruction.sum(dim=1).max()), 1), Lk, dtype=torch.float64, device=device)

        def collect(block: BlockView) -> None:  # head-mean attention of the instruction rows only
            width, rows = block.probs.shape[-1], block.q_index.to(device)
            mean = block.probs.double().to(device).mean(dim=1)  # (B, n, w)
            chosen = instruction[:, rows]
            batch_index = torch.arange(B, device=device)[:, None].expand_as(chosen)[chosen]
            readers[batch_index, slot[:, rows][chosen], :width] = mean[chosen]

        probs_pass(collect)
        visual = readers * image[:, None, :]  # (B, m, Lk): a_k(j) on the image, rows in column order
        steps = (visual[:, 1:] - visual[:, :-1]).clamp(min=0)  # (B, m-1, Lk)
        pairs = (torch.arange(1, readers.shape[1], device=device)[None, :] < instruction.sum(dim=1)[:, None])
        shifts = (steps * pairs[:, :, None]).sum(dim=1)  # only consecutive pairs of real instruction rows
        peak = shifts.amax(dim=-1, keepdim=True)
        return torch.where(peak > 0, shifts / torch.where(peak > 0, peak, 1.0), 0.0).float()

    # the edit -------------------------------------------------------------------------------------------------
    def probs_mod(self, probs: Tensor, q_index: Tensor, keep: Tensor | None, call: AttentionCall) -> Tensor:
        if self._saliency is None or self.is_identity():
            return probs
        device, width = probs.device, probs.shape[-1]
        saliency = self._saliency[:, :width].to(device=device, dtype=probs.dtype)
        query = instruction_keys(call)[:, :width].to(device)
        factor = 1.0 + self.alpha * saliency + self.beta * query.to(probs.dtype)  # (B, w)
        scaled = probs * factor[:, None, None, :]
        total, new_total = probs.sum(dim=-1, keepdim=True), scaled.sum(dim=-1, keepdim=True)
        edited = scaled * (total / torch.where(new_total > 0, new_total, 1.0))
        rows = answer_rows(call)[:, q_index.to(call.device)].to(device)[:, None, :, None]
        act = rows & self.head_column(call).to(device) & (new_total > 0)
        return torch.where(act, edited, probs)
