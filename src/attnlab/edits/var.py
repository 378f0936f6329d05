"""``var``: Visual Attention Redistribution — image-centric heads give part of their sink attention to the image."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from attnlab.edits import EDITS
from attnlab.edits._move import move_mass
from attnlab.edits._vlm import after_image_rows, image_keys, pad_columns
from attnlab.edits.base import AttentionCall, Edit
from attnlab.errors import ConfigError
from attnlab.params import IndexList, Range, validated
from attnlab.roles import RoleList

FIRST_LAYER = 2  # the released code detects sinks from layer 2 on (``sink_select_layers = layers[2:]``)


@EDITS.register("var")
class Var(Edit):
    """VAR: in image-centric (head, query) rows, sink tokens keep p of their attention; the rest goes to the image.

    Kang et al. 2025, "See What You Are Told: Visual Attention Sink in Large Multimodal Models", ICLR 2025, §4, and
    the released code (seilk/VisAttnSink ``src/logic/logic.py``) (METHODS.md #8, high confidence). Per layer:

    1. **Sink tokens** from the decoder layer's input hidden states x (``call.hidden_states``), on the prompt call:
       φ(x) = |x / sqrt(mean(x²) + ε)| (RMSNorm without its gain); a token is a sink if
       ``max_{d ∈ D_sink} φ(x)[d] > τ`` (:func:`attnlab.functional.sink_dims.sink_tokens`). Sinks inside an image
       are visual sinks, the others text sinks (e.g. BOS). D_sink: ``dims`` (the paper's {1415, 2533} for
       LLaMA-2-7B); by default, per sequence, the ``top_dims`` dimensions with the largest max φ over the
       sequence's real tokens (:func:`~attnlab.functional.sink_dims.sink_flags`, shared with the ``visual_sinks``
       probe; a sequence's sinks never depend on its batch mates). Decode calls (q_len < kv_len) reuse the prompt
       call's sinks, as the released code does (it detects them during prefill only).
    2. **Image-centric selection**, per (sequence b, head h, query i): the image budget ``Σ_{j∈I} A_ij ≥ summ``
       and the visual sinks' share of it ``Σ_{j∈I∩S} A_ij / Σ_{j∈I} A_ij ≤ ρ``; only query rows after the
       sequence's last image token (so during prefill the queries after the image, during decoding every new
       token); only in sequences with at least one visual sink (the released code edits nothing in a layer
       without one). I = the image tokens of every image of the sequence (``call.key_roles``).
    3. **Redistribution** in selected rows: ``A'_ij = p·A_ij`` on every sink j (visual and text); the freed
       ``(1-p)·Σ_{j∈S} A_ij`` goes to the non-sink image tokens in proportion to their attention (the shared
       :func:`attnlab.edits._move.move_mass`). Rows keep their sum. ``keys=`` (roles) widens or moves the
       receiving set: the non-sink keys of those roles (``keys=image+text``); the selection still reads the image.

    Layers: by default 2 … L-1, without the last layer when ``except_last_layer`` (the released defaults: layers
    2 … L-2); ``layers=`` picks them explicitly instead. ``heads`` restricts the automatic selection further.
    Defaults τ = 20, ρ = 0.5, summ = 0.2, p = 0.6 (the paper's LLaVA-1.5-7B config). p = 1 is the identity.
    The released code adds 1e-6 per image key to the share's denominator; here a row with no image attention is
    simply not selected (its budget is 0 < summ). Runs on the blocked eager path; needs the layer input hidden
    states (``needs_hidden_states``).

    Args:
        p: share of the sinks' attention they keep, in [0, 1]. tau: φ threshold τ > 0. rho: ρ in [0, 1].
        summ: minimum image budget in [0, 1]. dims: D_sink (hidden dimensions), or None for the data-driven
        ``top_dims``. top_dims: how many dimensions the data-driven D_sink takes (1 … 64).
        except_last_layer: leave the last layer alone (default layers only). layers, heads, queries: selection.
        keys: roles of the keys that receive the budget (default: the image tokens).

    Raises:
        ConfigError: a parameter out of range; when it runs, a dimension of ``dims`` the model does not have, no
            hidden states on a prompt call, or a decode call with no prompt call of its layer before it.
    """

    stage = "probs"
    needs_hidden_states: ClassVar[bool] = True
    uses_key_roles: ClassVar[bool] = True  # keys= names the tokens that receive the budget (default: the image)

    identity: ClassVar[dict[str, Any]] = {"p": 1.0}

    @validated
    def __init__(self, p: Annotated[float, Range(ge=0.0, le=1.0)] = 0.6,
                 tau: Annotated[float, Range(gt=0.0, le=1e6)] = 20.0,
                 rho: Annotated[float, Range(ge=0.0, le=1.0)] = 0.5,
                 summ: Annotated[float, Range(ge=0.0, le=1.0)] = 0.2, dims: IndexList | None = None,
                 top_dims: Annotated[int, Range(ge=1, le=64)] = 2, except_last_layer: bool = True,
                 layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        super().__init__(layers=layers, heads=heads, queries=queries, keys=keys)
        self.p, self.tau, self.rho, self.summ = p, tau, rho, summ
        self.dims, self.top_dims, self.except_last_layer = dims, top_dims, except_last_layer
        self._num_layers: int | None = None
        self._prompt_sinks: dict[int, Tensor] = {}  # layer -> (B, L) bool sinks of its last prompt call
        self._call_sinks: tuple[AttentionCall, Tensor] | None = None

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"p": self.p, "tau": self.tau, "rho": self.rho, "summ": self.summ}
        params.update({"top_dims": self.top_dims} if self.dims is None else {"dims": list(self.dims)})
        params["except_last_layer"] = self.except_last_layer
        return params

    def reset(self) -> None:
        super().reset()
        self._prompt_sinks, self._call_sinks = {}, None

    # layers ---------------------------------------------------------------------------------------------------
    def check_model(self, num_layers: int, num_heads: int) -> None:
        super().check_model(num_layers, num_heads)
        self._num_layers = num_layers

    def applies_to(self, layer_idx: int) -> bool:
        """``layers`` when given; else layers ≥ 2, without the last one when ``except_last_layer`` (the number of
        layers is known once a Session checked the edit against the model)."""
        if self.layers is not None:
            return layer_idx in self.layers
        last = self._num_layers is not None and layer_idx == self._num_layers - 1
        return layer_idx >= FIRST_LAYER and not (self.except_last_layer and last)

    # sinks ----------------------------------------------------------------------------------------------------
    def sinks(self, call: AttentionCall) -> Tensor:
        """(B, Lk) bool: the call's sink tokens (visual and text), computed once per call."""
        if self._call_sinks is not None and self._call_sinks[0] is call:
            return self._call_sinks[1]
        if call.q_len == call.kv_len:  # the prompt call: every token's hidden state is here
            hidden = call.hidden_states
            if hidden is None:
                raise ConfigError(f"edit 'var': layer {call.layer_idx}'s call has no hidden states (the Session "
                                  "fills call.hidden_states for edits with needs_hidden_states)")
            sinks = self._detect(hidden.to(call.device), call)
            self._prompt_sinks[call.layer_idx] = sinks
        else:
            stored = self._prompt_sinks.get(call.layer_idx)
            if stored is None or stored.shape[0] != call.batch:
                raise ConfigError(f"edit 'var': layer {call.layer_idx}'s call has q_len {call.q_len} < kv_len "
                                  f"{call.kv_len} (a KV cache) and no prompt call of batch {call.batch} ran in this "
                                  "session before it; run the prompt inside the session")
            sinks = pad_columns(stored, call.kv_len, False)
        self._call_sinks = (call, sinks)
        return sinks

    def _detect(self, hidden: Tensor, call: AttentionCall) -> Tensor:
        """(B, Lk) bool sinks of a prompt call: D_sink per sequence (:func:`~attnlab.functional.sink_dims.sink_flags`,
        so a sequence's sinks do not depend on its batch mates)."""
        from attnlab.functional.sink_dims import sink_flags

        width = hidden.shape[-1]
        if self.dims is not None and max(self.dims) >= width:
            raise ConfigError(f"edit 'var': dims={list(self.dims)} but the hidden states have {width} "
                              f"dimensions (0…{width - 1})")
        flags, _ = sink_flags(hidden, call.query_valid, self.dims, top=min(self.top_dims, width), tau=self.tau)
        return flags.to(call.device) & call.key_valid

    # the edit -------------------------------------------------------------------------------------------------
    def probs_mod(self, probs: Tensor, q_index: Tensor, keep: Tensor | None, call: AttentionCall) -> Tensor:
        if self.p == 1.0:
            return probs
        image_all = image_keys(call)
        if not bool(image_all.any()):
            return probs
        sinks_all = self.sinks(call)
        has_visual_sink = (image_all & sinks_all).any(dim=-1)  # (B,)
        width, device = probs.shape[-1], probs.device
        image = image_all[:, :width].to(device)[:, None, None, :]  # (B, 1, 1, w)
        sinks = sinks_all[:, :width].to(device)[:, None, None, :]
        rows = after_image_rows(call)[:, q_index.to(call.device)] & has_visual_sink[:, None]  # (B, n)
        budget = (probs * image).sum(dim=-1, keepdim=True)  # Σ_{j∈I} A_ij, (B, Hq, n, 1)
        sink_share = (probs * (image & sinks)).sum(dim=-1, keepdim=True) / torch.where(budget > 0, budget, 1.0)
        selected = (budget >= self.summ) & (budget > 0) & (sink_share <= self.rho)
        selected = selected & rows.to(device)[:, None, :, None] & self.head_column(call).to(device)
        receivers = image if self.keys is None else self.key_role_mask(call)[:, :width].to(device)[:, None, None, :]
        return move_mass(probs, sinks, receivers & ~sinks, self.p, selected)
