"""One attention call, made ready for the planner and the executors: its keep mask, its keys and its call record.

Shapes: B batch, Hq num_heads, Hkv num_kv_heads, Lq q_len, Lk kv_len, D head_dim, Dv value head dim.

Token bookkeeping. The session reads each forward's 2-D ``attention_mask`` into a
:class:`~attnlab.probes.base.SequenceInfo` (which tokens are real, their real-token positions). An attention call's
keys are the last Lk of those tokens, unless a forward argument is a :class:`TokenPolicy` (an attnlab KV-cache
policy that keeps only some tokens, such as :class:`attnlab.capture.cache.SinkWindowCache`): then the policy says
which token each key is. The policy may also hand the session a probe for that forward (H2O scores), so it reads
attention the way every probe does; the session knows nothing else about caches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError, UnsupportedModelError
from attnlab.functional.attention import causal_keep
from attnlab.probes.base import AttentionCall, Probe, SequenceInfo

SUPPORTED_FAMILIES = "Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo, GPT-NeoX, BERT, RoBERTa and other models whose " \
    "attention goes through transformers' AttentionInterface"


@runtime_checkable
class TokenPolicy(Protocol):
    """A forward argument that decides which tokens stay as keys (a KV-cache policy).

    ``bind_forward(sequence)`` is called once per forward pass with its tokens; it may raise ConfigError for
    batches it cannot handle and returns a probe to run on that forward's attention calls (or None).
    ``key_index(layer_idx)`` is the (B, Lk) long token index of each key the layer attends to, or None."""

    def bind_forward(self, sequence: SequenceInfo) -> Probe | None: ...

    def key_index(self, layer_idx: int) -> Tensor | None: ...


@dataclass(frozen=True)
class ForwardState:
    """What the session knows about the forward pass in flight.

    Attributes:
        sequence: its tokens. mask_length: columns of its 2-D attention_mask (tokens so far), or None.
        policy: a TokenPolicy among its arguments, or None. probes: probes the policy added for this forward.
    """

    sequence: SequenceInfo
    mask_length: int | None
    policy: TokenPolicy | None = None
    probes: tuple[Probe, ...] = ()
    hidden: dict[int, Tensor] = field(default_factory=dict)  # layer → its input hidden states (edits that need them)

    def hidden_at(self, layer: int, batch: int, q_len: int) -> Tensor | None:
        """(B, Lq, hidden) input hidden states of ``layer`` at the call's queries, or None if not recorded."""
        hidden = self.hidden.pop(layer, None)  # one call per layer and forward: free it once read
        if hidden is None or hidden.shape[0] != batch or hidden.shape[1] < q_len:
            return None
        return hidden[:, hidden.shape[1] - q_len:]


def find_policy(kwargs: dict[str, Any]) -> TokenPolicy | None:
    """The first forward keyword argument that implements :class:`TokenPolicy`, or None."""
    return next((value for value in kwargs.values() if isinstance(value, TokenPolicy)), None)


def read_forward(args: tuple, kwargs: dict[str, Any], num_sequences: int, roles: Any = None
                 ) -> tuple[ForwardState | None, int]:
    """``(ForwardState, new tokens)`` of a forward pass from its arguments: ``input_ids`` (or ``inputs_embeds``),
    a 2-D ``attention_mask`` (so padding never enters a statistic) and a TokenPolicy; ``(None, 0)`` without token
    input. A policy is bound to the forward here (``bind_forward``) and may add a probe. ``roles(input_ids, valid,
    kwargs)`` gives the forward's :class:`attnlab.roles.TokenRoles` (a vision-language model), or None."""
    input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
    reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
    if reference is None:
        return None, 0
    batch, length = reference.shape[0], reference.shape[1]
    mask = kwargs.get("attention_mask")
    mask = mask if mask is not None and mask.dim() == 2 else None
    valid = torch.ones(batch, length, dtype=torch.bool, device=reference.device) if mask is None else mask.bool()
    token_roles = None if roles is None else roles(input_ids, valid, kwargs)
    sequence = SequenceInfo.from_mask(valid, input_ids, num_sequences, token_roles)
    policy = find_policy(kwargs)
    probe = None if policy is None else policy.bind_forward(sequence)
    return ForwardState(sequence=sequence, mask_length=None if mask is None else mask.shape[1], policy=policy,
                        probes=() if probe is None else (probe,)), length


def sample_rows(q_len: int, fraction: float, device: torch.device) -> Tensor:
    """Evenly spread query rows covering ``fraction`` of q_len (always includes the first and last rows)."""
    count = min(q_len, max(2, math.ceil(fraction * q_len)))
    return torch.linspace(0, q_len - 1, count, device=device).round().long().unique()


def keep_mask(attention_mask: Tensor | None, q_len: int, kv_len: int, causal: bool,
              device: torch.device) -> Tensor | None:
    """Boolean keep mask (B|1, 1, Lq, Lk) matching what SDPA would apply, or None (all visible)."""
    if attention_mask is None:
        if causal and q_len > 1:
            # SDPA's is_causal is aligned top-left (HF crops keys to q_len in that case).
            return causal_keep(q_len, kv_len, device, offset=0)[None, None]
        return None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2  # additive 0 / -inf masks


def drop_empty_slots(key: Tensor, value: Tensor, attention_mask: Tensor | None, q_len: int, causal: bool,
                     mask_length: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Key, value and mask without the slots no token fills yet (a static cache holds more slots than tokens).

    The tokens so far are known from an explicit 2-D attention_mask (``mask_length``) or, without a mask, from
    SDPA's top-left causal alignment (keys after q_len are not attended). The output is unchanged (those slots are
    masked or cropped anyway); the probes never count them as keys."""
    seen = mask_length
    if attention_mask is None and causal and 1 < q_len < key.shape[2]:
        seen = q_len
    if seen is not None and key.shape[2] > seen:
        key, value = key[:, :, :seen], value[:, :, :seen]
        attention_mask = None if attention_mask is None else attention_mask[..., :seen]
    return key, value, attention_mask


def build_call(layer: int, query: Tensor, key: Tensor, value: Tensor, *, causal: bool, scale: float,
               forward: ForwardState | None, num_sequences: int) -> AttentionCall:
    """The call record: which query/key tokens are real and their real-token positions.

    Keys are the last Lk tokens of the forward (a cache cropped to a window keeps the most recent ones) unless the
    forward's TokenPolicy names them. Without usable token info (no forward hook data, another batch size, or
    inputs_embeds of another length) every key is real and positions count from 0."""
    return call_record(layer, num_heads=query.shape[1], num_kv_heads=key.shape[1], q_len=query.shape[2],
                       value=value, causal=causal, scale=scale, forward=forward, num_sequences=num_sequences)


def call_record(layer: int, *, num_heads: int, num_kv_heads: int, q_len: int, value: Tensor, causal: bool,
                scale: float, forward: ForwardState | None, num_sequences: int) -> AttentionCall:
    """:func:`build_call` from sizes: value (B, Hkv, Lk, Dv) gives batch, kv_len and device."""
    B, Lq, Lk, device = value.shape[0], q_len, value.shape[2], value.device
    sequence = None if forward is None else forward.sequence
    if sequence is None or sequence.valid.shape[0] != B or sequence.valid.shape[1] < Lk:
        valid = torch.ones(B, Lk, dtype=torch.bool, device=device)
        sequence = SequenceInfo.from_mask(valid, None, num_sequences)
    length = sequence.valid.shape[1]
    index = forward.policy.key_index(layer) if forward is not None and forward.policy is not None else None
    if index is not None and index.shape[-1] == Lk:  # the policy says which tokens it kept
        index = index.to(sequence.valid.device)
        if length > int(index.max()):
            key_valid = sequence.valid.gather(1, index).to(device)
            key_positions = sequence.positions.gather(1, index).to(device)
        else:  # only the new tokens' mask is known: kept tokens are real, positions are token indices
            key_valid = torch.ones(B, Lk, dtype=torch.bool, device=device)
            key_positions = index.to(device)
    else:
        key_valid = sequence.valid[:, length - Lk :].to(device)
        key_positions = sequence.positions[:, length - Lk :].to(device)
    key_roles = None
    if sequence.roles is not None:
        codes = sequence.roles.codes
        if index is not None and index.shape[-1] == Lk:  # the policy's kept tokens (unknown roles past the mask)
            key_roles = codes.gather(1, index.to(codes.device)).to(device) if length > int(index.max()) else None
        else:
            key_roles = codes[:, length - Lk:].to(device)
    return AttentionCall(
        layer_idx=layer, num_heads=num_heads, num_kv_heads=num_kv_heads, q_len=Lq, kv_len=Lk, causal=causal,
        scale=scale, value=value.detach(), query_valid=key_valid[:, Lk - Lq:], key_valid=key_valid,
        query_positions=key_positions[:, Lk - Lq:], key_positions=key_positions, sequence=sequence,
        query_roles=None if key_roles is None else key_roles[:, Lk - Lq:], key_roles=key_roles,
        hidden_states=None if forward is None else forward.hidden_at(layer, B, Lq),
    )


def implied_call(layer: int, attention_map: Any, forward: ForwardState | None, num_sequences: int,
                 num_kv_heads: int | None = None) -> AttentionCall:
    """The call record of an implied attention map (:class:`attnlab.functional.implied.ImpliedMap`: batch,
    num_heads, q_len, kv_len, value (B, H, Lk, Dv) per query head, causal).

    The map's value is GQA-expanded (query head h reads kv head ``h // (H // Hkv)``). With ``num_kv_heads`` (the
    model's Hkv) below num_heads the record holds the value de-expanded to (B, Hkv, Lk, Dv) and that Hkv, as a
    softmax call's record does, so probes sized by ``facts.num_kv_heads`` fit; otherwise num_kv_heads is
    num_heads. ``scale`` is 1.0: the map's weights already hold whatever scale the layer uses, and no probe
    rescales them.

    Raises:
        ShapeError: the map's value does not match its sizes, or num_heads is not a multiple of num_kv_heads.
    """
    value = attention_map.value
    heads = attention_map.num_heads
    expected = (attention_map.batch, heads, attention_map.kv_len)
    if value.dim() != 4 or tuple(value.shape[:3]) != expected:
        raise ShapeError(f"expected the implied map's value as (batch, num_heads, kv_len, Dv) = {expected} + (Dv,), "
                         f"got {tuple(value.shape)}")
    kv_heads = heads if num_kv_heads is None or num_kv_heads >= heads else num_kv_heads
    if heads % kv_heads:
        raise ShapeError(f"expected the implied map's num_heads={heads} to be a multiple of num_kv_heads={kv_heads}")
    value = value[:, :: heads // kv_heads]  # repeat_interleave'd per group: one head of each group
    return call_record(layer, num_heads=heads, num_kv_heads=kv_heads, q_len=attention_map.q_len, value=value,
                       causal=bool(attention_map.causal), scale=1.0, forward=forward, num_sequences=num_sequences)


def prepare_call(module: Any, layer: int, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 kwargs: dict[str, Any], forward: ForwardState | None, num_sequences: int
                 ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, AttentionCall]:
    """``(key, value, attention_mask, keep, call)`` for one attention call as transformers passed it: empty cache
    slots dropped, the keep mask SDPA would apply, and the call record.

    Raises:
        ConfigError: attention dropout is active (the model is in training mode).
    """
    if kwargs.get("dropout", 0.0) and getattr(module, "training", False):
        raise ConfigError("attnlab probes need the model in eval mode (attention dropout is active); call model.eval()")
    is_causal = kwargs.get("is_causal")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    mask_length = None if forward is None else forward.mask_length
    key, value, attention_mask = drop_empty_slots(key, value, attention_mask, query.shape[2], causal, mask_length)
    keep = keep_mask(attention_mask, query.shape[2], key.shape[2], causal, query.device)
    scale = kwargs.get("scaling")
    scale = float(query.shape[-1] ** -0.5 if scale is None else scale)
    call = build_call(layer, query, key, value, causal=causal, scale=scale, forward=forward, num_sequences=num_sequences)
    return key, value, attention_mask, keep, call


def make_probe(spec: str | Probe) -> Probe:
    """A Probe instance, or a new one of the registered probe named ``spec``."""
    if isinstance(spec, Probe):
        return spec
    if isinstance(spec, str):
        from attnlab.analyses import ANALYSES
        from attnlab.probes import PROBES

        if spec not in PROBES and spec in ANALYSES:
            raise ConfigError(f"probe {spec} drives the model itself (an analysis); run it with `attnlab probe` / "
                              "attnlab.pipeline.run_probes")
        return PROBES.get(spec)()
    raise TypeError(f"probes must be names or Probe instances, got {type(spec).__name__}")


def bound_probes(specs: Any, facts: Any) -> list[Probe]:
    """Probe instances for ``specs`` (names or Probes; :func:`make_probe`), each bound to ``facts``.

    Raises ConfigError when a probe is given twice."""
    probes = [make_probe(spec) for spec in specs]
    names = [probe.name for probe in probes]
    if len(set(names)) != len(names):
        raise ConfigError(f"each probe may be given once, got {names}")
    for probe in probes:
        probe.bind(facts)
    return probes


def check_attention_kwargs(model_name: str, kwargs: dict[str, Any]) -> None:
    """Refuse attention inputs attnlab does not model (learned sink logits, additive position biases)."""
    for unsupported in ("s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise UnsupportedModelError(
                f"{model_name} passes {unsupported!r} to its attention function (learned sink logits or an additive "
                f"position bias), which attnlab does not model yet; supported: {SUPPORTED_FAMILIES} without learned "
                "sinks or position biases")


def check_model_supported(model: Any) -> None:
    """Raise UnsupportedModelError unless ``model`` is a transformers model routing attention through the
    AttentionInterface."""
    name = type(model).__name__
    if not hasattr(model, "is_backend_compatible") or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(f"{name} is not a transformers PreTrainedModel; attnlab supports {SUPPORTED_FAMILIES}")
    if not model.is_backend_compatible():
        raise UnsupportedModelError(f"{name} does not route attention through transformers' AttentionInterface, so "
                                    f"attnlab cannot observe it; supported: {SUPPORTED_FAMILIES}")
