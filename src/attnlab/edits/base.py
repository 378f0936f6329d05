"""The edit contract: where an edit acts, what it sees, and the forms it offers.

An edit changes one stage of attention (docs/edits.md; docs/ARCHITECTURE.md, "The call record"), in this fixed order:

    positions → logits → mask → probs → output

Edits of different stages compose in that order whatever order they were given in; edits of the same stage
compose in the order given. Every edit is selectable per layer (``layers``) and per **query head** (``heads``):
on a GQA model query head h reads kv head ``h // (num_heads // num_kv_heads)``, and an edit restricted to head h
never touches the other query heads of h's kv group.

Every hook receives the call record :class:`~attnlab.probes.base.AttentionCall` (the same one probes see) and
computes its head selection from it: ``head_mask(call)`` (Hq,) bool, ``head_column(call)`` (1, Hq, 1, 1).

Forms. Each hook has a default that does nothing; an edit overrides the ones of its stage:
- ``logits``: ``logits_mod`` (any edit of the logits, a ``LogitsMod`` of the blocked kernel; eager path only),
  ``as_score_mod`` (the same edit as a FlexAttention ``ScoreMod``), or the fast forms ``query_scale`` (a
  multiplier on each query row's logits) and ``key_bias`` (an additive logit bias ``coef[h] * indicator[b, k]``),
  which run inside SDPA without materialising probs.
- ``mask``: ``keep_mod`` maps the current boolean keep mask (True = attend; the model's own mask first) to a new
  one; runs on every path. (A ``MaskMod`` is FlexAttention's per-element ``mask_mod(b, h, q_idx, kv_idx)``;
  ``evaluate_mask_mod`` turns one into a keep mask for a call.)
- ``probs``: ``probs_mod`` (eager path); edits whose effect on the output has a closed form also offer
  ``fast_output`` (e.g. ``(1-α)·o + α·v_self``) and then run on the fast path.
- ``output``: ``output_mod`` on the per-head output ``(batch, num_heads, q_len, head_dim)`` before ``o_proj``
  (``output_mod_at`` when the edit needs to know which query rows it is given).
- ``positions``: ``position_ids`` remaps the model's position ids (RoPE) before the forward pass.

Shapes: B batch, Hq num_heads, Hkv num_kv_heads, Lq q_len, Lk kv_len, n rows of a block, w keys of a block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.params import IndexList, coerce, validated
from attnlab.probes.base import AttentionCall, SequenceInfo
from attnlab.roles import RoleList, codes_in, role_codes

if TYPE_CHECKING:
    from attnlab.functional.masked_attention import ScoreMod
    from attnlab.functional.masks import MaskMod

__all__ = ["STAGES", "AttentionCall", "Edit", "Stage", "evaluate_mask_mod"]

Stage = Literal["positions", "logits", "mask", "probs", "output"]
STAGES: tuple[str, ...] = ("positions", "logits", "mask", "probs", "output")


class Edit:
    """Base class of every edit. ``@EDITS.register("name")`` names a subclass; it sets ``stage``, ``fast`` and
    ``identity``, declares its parameters with typed, bounded annotations on a ``@validated`` ``__init__``
    (:mod:`attnlab.params`) and overrides its stage's hooks.

    Args:
        layers: layer indices to act on (None = every layer).
        heads: query-head indices to act on (None = every head).
        queries: token roles (:data:`attnlab.roles.ROLES`: text, image, system, generated) of the query rows to act
            on (None = every row), e.g. ``("text",)``; on a model without roles (text-only) every real token is
            ``text``. Spec text joins roles with ``+``.
        keys: token roles of the keys to act on (None = every key): logits and mask edits change only those keys;
            a probs edit takes ``keys=`` only when it reads them itself (``uses_key_roles``); positions and output
            edits refuse it.

    Every edit also has ``steps`` (None = every call): the denoising steps it acts on, 0-based, set from spec text
    (``steps=0-11``) or :meth:`at_steps`. A call acts on it only when its ``call.step`` is known (a
    :class:`attnlab.diffusion.DiffusionSession`, or a text Session after ``set_step``) and in ``steps``.

    Raises:
        ConfigError: bad layers/heads (negative, empty), an unknown or empty role list, ``keys=`` on a stage that
            cannot take it, or a parameter out of range (in subclasses).
    """

    name: ClassVar[str] = "edit"
    stage: ClassVar[Stage] = "logits"
    fast: ClassVar[bool] = False  # True if the edit runs on the fast path (no probs materialised)
    needs_prepare: ClassVar[bool] = False  # True if the edit needs a pass over the call's probs first (ACT)
    needs_hidden_states: ClassVar[bool] = False  # True if it reads call.hidden_states (VAR's sink detection)
    uses_key_roles: ClassVar[bool] = False  # a probs edit that applies its own keys= selection (VAR's image keys)
    # params() values that make the edit the identity ({"tau": 1.0}), or None for an edit with no identity form.
    # Every registered edit declares it (tests/edits/test_edit_laws.py checks it against the kernel).
    identity: ClassVar[dict[str, Any] | None]
    steps: tuple[int, ...] | None = None  # denoising steps to act on (None = every call); see at_steps

    @validated
    def __init__(self, *, layers: IndexList | None = None, heads: IndexList | None = None,
                 queries: RoleList | None = None, keys: RoleList | None = None) -> None:
        self.layers, self.heads = layers, heads
        self.queries = None if queries is None else tuple(dict.fromkeys(queries))
        self.keys = None if keys is None else tuple(dict.fromkeys(keys))
        for chosen in (self.queries, self.keys):
            if chosen is not None:
                role_codes(chosen)  # refuses an empty selection given from Python
        stage = type(self).stage
        if self.queries is not None and stage == "positions":
            raise ConfigError(f"edit {self.name!r}: queries= selects query rows, but a positions edit changes the "
                              "model's position ids for every token")
        if self.keys is not None and (stage in ("positions", "output") or
                                      (stage == "probs" and not type(self).uses_key_roles)):
            article = "an" if stage[0] in "aeiou" else "a"
            raise ConfigError(f"edit {self.name!r}: keys= selects keys, which {article} {stage}-stage edit "
                              f"{'cannot restrict' if stage != 'probs' else 'does not read'}; use queries= or a "
                              "logits/mask edit")

    @property
    def role_restricted(self) -> bool:
        """True if ``queries=`` or ``keys=`` narrows the edit to some token roles (it then runs on the eager path)."""
        return self.queries is not None or self.keys is not None

    # identity and description -------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The edit's own parameters (not layers/heads), for its spec string and the results."""
        return {}

    def is_identity(self) -> bool:
        """True if ``params()`` matches the class's ``identity`` (τ=1, γ=1, β=1, α=0, scale 1, ...)."""
        identity = getattr(type(self), "identity", None)
        return identity is not None and all(self.params().get(key) == value for key, value in identity.items())

    def remaps_positions(self) -> bool:
        """True if the edit changes the model's position ids: every positions-stage edit unless it says otherwise
        (``cca:positions=false`` only masks). The session refuses such edits on multi-axis RoPE models (M-RoPE) and
        calls ``position_ids`` only for them."""
        return type(self).stage == "positions"

    def at_steps(self, steps: Any) -> Edit:
        """Schedule the edit on denoising steps ``steps`` (an IndexList: ints, ``"0-11"``, ``"12-49"``; None =
        every step) and return it. Radial attention's "dense for the first steps" is ``at_steps("12-49")``.

        Raises ConfigError on a malformed or negative step list."""
        self.steps = None if steps is None else coerce(steps, IndexList, owner=f"edit {self.name!r}", param="steps")
        return self

    def applies_at(self, step: int | None) -> bool:
        """True if the edit acts on a call of denoising step ``step`` (None: a call with no step, e.g. plain
        text; a step-scheduled edit never acts there)."""
        return self.steps is None or (step is not None and step in self.steps)

    def spec(self) -> str:
        """``name:key=value,...`` — the same form ``parse_edit_spec`` reads."""
        parts = [f"{key}={_format_value(value)}" for key, value in self.params().items()]
        for key in ("layers", "heads", "queries", "keys", "steps"):
            chosen = getattr(self, key)
            if chosen is not None:
                parts.append(f"{key}={'+'.join(str(v) for v in chosen)}")
        return f"{self.name}:{','.join(parts)}" if parts else self.name

    def __repr__(self) -> str:
        return f"<edit {self.spec()}>"

    def reset(self) -> None:
        """Forget what earlier attention calls left behind (the head-mask cache; subclasses add their own state,
        e.g. ``mean_ablation``'s prefill means). A Session calls it when it starts; copies call it
        (``head_patch.with_source``), so no cache of the original leaks into them."""
        self.__dict__.pop("_head_masks", None)
        self.__dict__.pop("_role_cache", None)

    # selection ----------------------------------------------------------------------------------------------
    def applies_to(self, layer_idx: int) -> bool:
        return self.layers is None or layer_idx in self.layers

    def check_model(self, num_layers: int, num_heads: int) -> None:
        """Raise ConfigError if ``layers`` or ``heads`` name a layer or query head the model does not have."""
        if self.layers is not None and max(self.layers) >= num_layers:
            raise ConfigError(f"edit {self.spec()!r}: layers={list(self.layers)} but the model has "
                              f"{num_layers} layers (0…{num_layers - 1})")
        self._check_heads(num_heads)

    def _check_heads(self, num_heads: int) -> None:
        if self.heads is not None and max(self.heads) >= num_heads:
            raise ConfigError(f"edit {self.name!r}: heads={list(self.heads)} but the model has "
                              f"num_heads={num_heads} query heads (0…{num_heads - 1})")

    def head_mask(self, call: AttentionCall) -> Tensor:
        """(Hq,) bool on the call's device: the query heads this edit acts on (cached per num_heads and device).

        Raises ConfigError if a head index is ≥ ``call.num_heads``."""
        cache: dict[tuple, Tensor] = self.__dict__.setdefault("_head_masks", {})
        key = (call.num_heads, call.device, self.heads)
        if key not in cache:
            self._check_heads(call.num_heads)
            selected = torch.ones(call.num_heads, dtype=torch.bool)
            if self.heads is not None:
                selected.zero_()
                selected[list(self.heads)] = True
            cache[key] = selected.to(call.device)
        return cache[key]

    def head_column(self, call: AttentionCall) -> Tensor:
        """(1, Hq, 1, 1) bool: ``head_mask(call)`` shaped to broadcast over (B, Hq, rows, keys)."""
        return self.head_mask(call).view(1, -1, 1, 1)

    def query_role_mask(self, call: AttentionCall) -> Tensor:
        """(B, Lq) bool: query rows whose role is in ``queries`` (all True when unset). Without roles on the call
        (a text-only model) every real token counts as ``text``. Cached for the call (the blocks of one call)."""
        return self._role_masks(call)[0]

    def key_role_mask(self, call: AttentionCall) -> Tensor:
        """(B, Lk) bool: keys whose role is in ``keys`` (all True when unset; text-only models: real tokens are
        ``text``). Cached for the call."""
        return self._role_masks(call)[1]

    def _role_masks(self, call: AttentionCall) -> tuple[Tensor, Tensor]:
        cached = self.__dict__.get("_role_cache")
        if cached is None or cached[0] is not call:
            cached = (call, _role_mask(self.queries, call.query_roles, call.query_valid),
                      _role_mask(self.keys, call.key_roles, call.key_valid))
            self.__dict__["_role_cache"] = cached
        return cached[1], cached[2]

    def selection(self, call: AttentionCall, q_index: Tensor | None = None, width: int | None = None) -> Tensor:
        """(B, Hq, n, w) bool — or broadcastable — where the edit acts: its heads × query rows of its ``queries``
        roles (rows ``q_index``, all when None) × keys of its ``keys`` roles (the first ``width``)."""
        selected = self.head_column(call)
        if self.queries is not None:
            rows = self.query_role_mask(call)
            rows = rows if q_index is None else rows[:, q_index.to(rows.device)]
            selected = selected & rows[:, None, :, None]
        if self.keys is not None:
            keys = self.key_role_mask(call)
            selected = selected & keys[:, None, None, : width or keys.shape[1]]
        return selected

    # hooks (defaults do nothing) -------------------------------------------------------------------------------
    def position_ids(self, position_ids: Tensor, sequence: SequenceInfo) -> Tensor:
        """positions stage: (B, L) long position ids of the forward's new tokens → remapped ids. ``sequence`` is
        the forward's tokens (its roles hold the image grids on a vision-language model)."""
        return position_ids

    def query_scale(self, call: AttentionCall) -> Tensor | None:
        """logits stage, fast form: a multiplier on logits broadcastable to (B, Hq, Lq, 1), or None."""
        return None

    def key_bias(self, call: AttentionCall) -> tuple[Tensor, Tensor] | None:
        """logits stage, fast form: ``(coef (Hq,), indicator (B, Lk))``, adding ``coef[h] * indicator[b, k]``."""
        return None

    def logits_mod(self, logits: Tensor, q_index: Tensor, call: AttentionCall) -> Tensor:
        """logits stage (a ``LogitsMod`` bound to the call): logits (B, Hq, n, w) of query rows ``q_index`` (n,)
        over keys 0…w-1 → edited logits. The default applies ``query_scale``/``key_bias``."""
        scale = self.query_scale(call)
        if scale is not None:
            scale = scale.expand(-1, -1, call.q_len, -1)[:, :, q_index.to(scale.device)]
            logits = logits * scale
        bias = self.key_bias(call)
        if bias is not None:
            coef, indicator = bias
            width = logits.shape[-1]
            logits = logits + coef.view(1, -1, 1, 1) * indicator[:, None, None, :width].to(logits.dtype)
        return logits

    def as_score_mod(self, call: AttentionCall) -> ScoreMod | None:
        """logits stage, Flex form: a ``ScoreMod`` ``(logits, batch_idx, head_idx, q_idx, kv_idx) -> logits`` with
        call-local indices (query row, key index), or None if the edit has none. The default derives it from
        ``query_scale``/``key_bias``."""
        scale = self.query_scale(call)
        bias = self.key_bias(call)
        if scale is None and bias is None:
            return None
        table = None if scale is None else scale.expand(call.batch, call.num_heads, call.q_len, 1)[..., 0].contiguous()
        coef, indicator = (None, None) if bias is None else (bias[0], bias[1].to(torch.float32))

        def score_mod(logits: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            if table is not None:
                logits = logits * table[b, h, q_idx]
            if coef is not None:
                logits = logits + coef[h] * indicator[b, kv_idx]
            return logits

        return score_mod

    def skip_reason(self, call: AttentionCall) -> str | None:
        """Why the edit passes ``call`` through unchanged although its layers, heads and steps select it (e.g.
        ``"cross"``: radial and ultravico act only on self/joint calls over patches), or None when it acts on it.
        A skipped call is not counted as touched (``edit_report``). Pure: it counts nothing."""
        return None

    def skip_summary(self) -> str:
        """The calls the edit passed through so far, by reason (``"cross: 4, dense step: 8"``; "" for edits that
        skip nothing), for the edit report's ``skipped`` column."""
        return ""

    def keep_mod(self, keep: Tensor, call: AttentionCall) -> Tensor | None:
        """mask stage: the current keep (B|1, Hq|1, Lq, Lk) bool, True = attend → the new keep, or None (no change).

        Most mask edits AND a pattern into ``keep``; an edit may also open keys (CCA's rings) but must keep padding
        masked (``call.key_valid``)."""
        return None

    def prepare(self, call: AttentionCall, probs_pass: Any) -> None:
        """Called before the call's attention when ``needs_prepare``: ``probs_pass(on_block)`` runs the blocked
        kernel with the edits before this one and feeds each BlockView to ``on_block``."""

    def probs_mod(self, probs: Tensor, q_index: Tensor, keep: Tensor | None, call: AttentionCall) -> Tensor:
        """probs stage: probs (B, Hq, n, w) of query rows ``q_index`` → edited probs."""
        return probs

    def fast_output(self, output: Tensor, value: Tensor, keep: Tensor | None, call: AttentionCall) -> Tensor:
        """probs stage, fast form: the output (B, Hq, Lq, Dv) an edit of the probs would give, from the unedited
        output, value (B, Hkv, Lk, Dv) and the call's final keep mask. Only called when ``fast`` is True for a
        probs-stage edit."""
        raise NotImplementedError(f"edit {self.name!r} has no fast form")

    def output_mod(self, output: Tensor, call: AttentionCall) -> Tensor:
        """output stage: per-head output (B, Hq, n, Dv) → edited output, for an edit that acts on each query row
        alone (``head_scale``)."""
        return output

    def output_mod_at(self, output: Tensor, q_index: Tensor | None, call: AttentionCall) -> Tensor:
        """output stage, the form the edits machinery calls: per-head output (B, Hq, n, Dv) of query rows
        ``q_index`` (n,) long, or of every row 0…Lq-1 when None → edited output. The default applies
        ``output_mod``; an edit whose result depends on the row (``head_patch``) overrides this one."""
        return self.output_mod(output, call)


def _role_mask(chosen: tuple[str, ...] | None, codes: Tensor | None, valid: Tensor) -> Tensor:
    if chosen is None:
        return torch.ones_like(valid, dtype=torch.bool)
    if codes is None:  # a text-only model: every real token is text
        return valid.bool() if "text" in chosen else torch.zeros_like(valid, dtype=torch.bool)
    return codes_in(codes, role_codes(chosen))


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    return str(value)


def evaluate_mask_mod(mask_mod: MaskMod, call: AttentionCall) -> Tensor:
    """A ``MaskMod`` ``mask_mod(batch_idx, head_idx, q_idx, kv_idx) -> bool`` evaluated on this call's token
    positions (real-token positions, so left padding does not shift patterns) → bool (B, Hq|1, Lq, Lk)."""
    device = call.device
    batch_idx = torch.arange(call.batch, device=device).view(-1, 1, 1, 1)
    head_idx = torch.arange(call.num_heads, device=device).view(1, -1, 1, 1)
    q_idx = call.query_positions[:, None, :, None]
    kv_idx = call.key_positions[:, None, None, :]
    return mask_mod(batch_idx, head_idx, q_idx, kv_idx)
