"""Session: run probes inside any transformers model that uses the AttentionInterface.

    with Session(model, probes=["entropy", "sink", "distance", "norms"]) as session:
        for batch in windows:
            model(**batch)
    table = session.results()   # pandas DataFrame: probe, statistic, layer, head, position, value

On enter the session registers the "attnlab" backend, switches the model to it with
``model.set_attn_implementation`` and installs two kinds of standard PyTorch hooks: a forward pre-hook on the model
(to read the 2-D ``attention_mask`` and ``input_ids``, so padding never enters a statistic) and, when a probe needs
hidden states, forward hooks on the decoder layers. On exit (also on exceptions) it removes the hooks and restores
the previous attention implementation.

Paths (recorded per layer in ``session.paths``):
- ``sdpa``: no probe needs probs; transformers' own SDPA function runs, so logits are bit-identical to
  ``attn_implementation="sdpa"``.
- ``blocked_eager``: probes need probs; the blocked kernel (:func:`attnlab.functional.attention.blocked_attention`)
  computes output and probs one query block at a time in float32.
- ``sdpa+sampled_probs``: ``query_fraction < 1``; SDPA computes the output and the blocked kernel computes probs
  for an evenly spread sample of query rows only, which the probes see.
- with edits (``edits=[...]``, see :mod:`attnlab.edits.apply`): ``sdpa+edits`` (every edit has a fast form and no
  probe needs probs), ``sdpa+edits+sampled_probs``, ``flex+edits`` (``flex=True``) or ``blocked_eager+edits``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.analyses import ANALYSES
from attnlab.capture.architectures import attention_sizes, transformer_blocks
from attnlab.capture.backend import ACTIVE_SESSION, BACKEND_NAME, ensure_registered
from attnlab.columns import RESULT_COLUMNS
from attnlab.edits.apply import EditedCall, EditRecord, order_edits
from attnlab.edits.base import Edit, EditContext
from attnlab.errors import ConfigError, EditNotFiredError, UnsupportedModelError
from attnlab.functional.attention import BlockView, blocked_attention, causal_keep
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelShape, Probe, SequenceInfo

logger = logging.getLogger(__name__)

SUPPORTED_FAMILIES = "Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo, GPT-NeoX, BERT, RoBERTa and other models whose " \
    "attention goes through transformers' AttentionInterface"


def _make_probe(spec: str | Probe) -> Probe:
    if isinstance(spec, Probe):
        return spec
    if isinstance(spec, str):
        if spec not in PROBES and spec in ANALYSES:
            raise ConfigError(f"probe {spec} drives the model itself (an analysis); run it with `attnlab probe` / "
                              "attnlab.probe_run.run_probe_suite")
        return PROBES.get(spec)()
    raise TypeError(f"probes must be names or Probe instances, got {type(spec).__name__}")


def _make_edit(spec: str | Edit) -> Edit:
    if isinstance(spec, Edit):
        return spec
    if isinstance(spec, str):
        from attnlab.edits.spec import parse_edit_spec

        return parse_edit_spec(spec)
    raise TypeError(f"edits must be Edit instances or specs like 'temperature:tau=0.9', got {type(spec).__name__}")


def _cache_argument(kwargs: dict) -> Any:
    """The KV cache a forward call received (``cache`` in recent transformers, ``past_key_values`` before)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _sample_rows(q_len: int, fraction: float, device: torch.device) -> Tensor:
    """Evenly spread query rows covering ``fraction`` of q_len (always includes the first and last rows)."""
    count = min(q_len, max(2, math.ceil(fraction * q_len)))
    return torch.linspace(0, q_len - 1, count, device=device).round().long().unique()


class Session:
    """Run probes on every attention call of ``model`` while the context is active.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention uses the AttentionInterface.
        probes: names (see ``attnlab ls probes``) or Probe instances.
        block_size: query rows per block of the eager kernel (peak extra memory ∝ num_heads · block_size · kv_len).
        query_fraction: in (0, 1]; below 1, probes see only that fraction of query rows, evenly spread over
            positions, and the output comes from SDPA (faster; statistics become estimates).
        edits: Edit instances or specs (``"sink_window:sinks=4,window=252"``, see ``attnlab ls edits``), applied
            to every attention call of their layers in stage order (positions → logits → mask → probs → output),
            list order within a stage. Probes observe the edited attention.
        verify_rows: query rows per call on which each edit's effect is measured (``edit_report()``); 0 turns
            the measurement off (calls and heads are still counted).
        flex: run edits that SDPA cannot (``window_decay``) in compiled FlexAttention instead of the blocked
            eager kernel when no probe needs probs (the first call per shape compiles, ~20 s on CPU).

    Raises:
        UnsupportedModelError: the model does not route attention through the AttentionInterface.
        ConfigError: bad block_size / query_fraction / edit layers. RegistryError: unknown probe or edit name.
        EditNotFiredError: on a clean exit, if an edit never acted on any attention call.
    """

    def __init__(self, model: nn.Module, probes: Iterable[str | Probe] = (), *, block_size: int = 128,
                 query_fraction: float = 1.0, edits: Iterable[str | Edit] = (), verify_rows: int = 16,
                 flex: bool = False) -> None:
        if not hasattr(model, "is_backend_compatible") or not hasattr(model, "set_attn_implementation"):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a transformers PreTrainedModel; attnlab supports {SUPPORTED_FAMILIES}")
        if not model.is_backend_compatible():
            raise UnsupportedModelError(
                f"{type(model).__name__} does not route attention through transformers' AttentionInterface, so "
                f"attnlab cannot observe it; supported: {SUPPORTED_FAMILIES}")
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        if not 0 < query_fraction <= 1:
            raise ConfigError(f"query_fraction must be in (0, 1], got {query_fraction}")
        self.model = model
        self.block_size = block_size
        self.query_fraction = query_fraction
        self.probes: list[Probe] = [_make_probe(p) for p in probes]
        names = [p.name for p in self.probes]
        if len(set(names)) != len(names):
            raise ConfigError(f"each probe may be given once, got {names}")
        num_layers, num_heads, num_kv_heads = attention_sizes(model)
        self.shape = ModelShape(num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads)
        for probe in self.probes:
            probe.bind(self.shape)
        self.edits: list[Edit] = order_edits([_make_edit(e) for e in edits])
        for edit in self.edits:
            if edit.layers is not None and max(edit.layers) >= num_layers:
                raise ConfigError(f"edit {edit.spec()!r}: layers={list(edit.layers)} but the model has "
                                  f"{num_layers} layers (0…{num_layers - 1})")
            edit.head_selection(num_heads, torch.device("cpu"))  # ConfigError now if a head does not exist
        if verify_rows < 0:
            raise ConfigError(f"verify_rows must be >= 0, got {verify_rows}")
        self.verify_rows = verify_rows
        self.flex = flex
        self.edit_records: dict[int, EditRecord] = {id(edit): EditRecord() for edit in self.edits}
        self._position_edits = [edit for edit in self.edits if edit.stage == "positions"]
        self.needs_probs = any("probs" in p.needs for p in self.probes)
        self.needs_calls = any(p.needs & {"probs", "value"} for p in self.probes)
        self.needs_hidden = any("hidden_states" in p.needs for p in self.probes)
        self.paths: dict[int, str] = {}
        self.num_sequences = 0
        self.calls_per_layer: dict[int, int] = {}
        self._sequence: SequenceInfo | None = None
        self._mask_length: int | None = None
        self._token_cache: Any = None  # an attnlab KV-cache policy (SinkWindowCache) passed to this forward
        self._layer_of: dict[int, int] = {}
        self._hooks: list[Any] = []
        self._previous_impl: str | None = None
        self._token: Any = None

    # context management -------------------------------------------------------------------------------------
    def __enter__(self) -> Session:
        if ACTIVE_SESSION.get() is not None:
            raise ConfigError("another attnlab Session is already active in this context; sessions do not nest")
        ensure_registered()
        self._previous_impl = self.model.config._attn_implementation
        self.model.set_attn_implementation(BACKEND_NAME)
        self._token = ACTIVE_SESSION.set(self)
        self._hooks.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._after_forward))
        if self.needs_hidden:
            layers = transformer_blocks(self.model)
            if layers is None:
                logger.warning("could not find the decoder layers of %s; hidden-state probes will see nothing",
                               type(self.model).__name__)
            else:
                for index, layer in enumerate(layers):
                    self._hooks.append(layer.register_forward_hook(self._layer_hook(index)))
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._close()
        if exc_type is None:
            self.check_edits_fired()

    def _close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._token is not None:
            ACTIVE_SESSION.reset(self._token)
            self._token = None
        if self._previous_impl is not None:
            self.model.set_attn_implementation(self._previous_impl)

    # hooks --------------------------------------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            self._sequence = None
            return
        batch, length = reference.shape[0], reference.shape[1]
        self._mask_length = mask.shape[1] if mask is not None and mask.dim() == 2 else None
        cache = _cache_argument(kwargs)
        self._token_cache = cache if hasattr(cache, "token_index") else None
        if mask is not None and mask.dim() == 2:
            valid = mask.bool()
        else:
            valid = torch.ones(batch, length, dtype=torch.bool, device=reference.device)
        if self._token_cache is not None and not bool(valid.all()):
            raise ConfigError("SinkWindowCache does not support padded batches yet (its sinks are the first cache "
                              "slots, not each sequence's first real tokens); generate one sequence at a time")
        self._sequence = SequenceInfo.from_mask(valid, input_ids, self.num_sequences)
        if self._position_edits:
            return args, self._edit_positions(kwargs, batch, length, reference.device)
        return None

    def _edit_positions(self, kwargs: dict, batch: int, length: int, device: torch.device) -> dict:
        """Apply positions-stage edits to ``position_ids`` (built as transformers would if absent)."""
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            cache = _cache_argument(kwargs)
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            position_ids = torch.arange(past, past + length, device=device).expand(batch, length)
        edited = position_ids
        for edit in self._position_edits:
            edited = edit.position_ids(edited)
            record = self.edit_records[id(edit)]
            record.forward_passes_touched += 1
        return {**kwargs, "position_ids": edited}

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._sequence is not None:
            self.num_sequences += self._sequence.valid.shape[0]
            self.shape.max_len = max(self.shape.max_len, self._sequence.valid.shape[1])
        self._sequence, self._mask_length, self._token_cache = None, None, None

    def _layer_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if self._sequence is None or not isinstance(hidden, Tensor) or hidden.dim() != 3:
                return
            with torch.no_grad():
                for probe in self.probes:
                    if "hidden_states" in probe.needs:
                        probe.on_hidden_states(index, hidden.detach(), self._sequence)
        return hook

    # the attention call -------------------------------------------------------------------------------------
    def _layer_index(self, module: nn.Module) -> int:
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int):
            return layer_idx
        return self._layer_of.setdefault(id(module), len(self._layer_of))

    def attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, None]:
        """Called by the backend for every attention call; returns (output (B, Lq, Hq, Dv), None)."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = self._layer_index(module)
        self.calls_per_layer[layer] = self.calls_per_layer.get(layer, 0) + 1
        for unsupported in ("s_aux", "position_bias"):
            if kwargs.get(unsupported) is not None:
                raise UnsupportedModelError(
                    f"{type(self.model).__name__} passes {unsupported!r} to its attention function (learned sink "
                    "logits or an additive position bias), which attnlab does not model yet; supported: "
                    f"{SUPPORTED_FAMILIES} without learned sinks or position biases")
        softcap = kwargs.get("softcap")
        edits = [edit for edit in self.edits if edit.applies_to(layer)]
        h2o = self._token_cache is not None and self._token_cache.needs_attention
        if not self.needs_calls and softcap is None and not edits and self._token_cache is None:
            self.paths[layer] = "sdpa"
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        dropout = kwargs.get("dropout", 0.0)
        if dropout and module.training:
            raise ConfigError("attnlab probes need the model in eval mode (attention dropout is active); call model.eval()")
        is_causal = kwargs.get("is_causal")
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        seen = self._mask_length  # tokens so far, known only from an explicit 2-D attention_mask
        if attention_mask is None and causal and 1 < query.shape[2] < key.shape[2]:
            seen = query.shape[2]  # SDPA's top-left causal alignment: the keys after q_len are not attended
        if seen is not None and key.shape[2] > seen:
            # A static cache holds more slots than tokens so far; the extra slots are empty. Drop them so the
            # probes never count them as keys (the output is unchanged: they are masked or cropped anyway).
            key, value = key[:, :, :seen], value[:, :, :seen]
            attention_mask = None if attention_mask is None else attention_mask[..., :seen]
        keep = self._keep_mask(attention_mask, query.shape[2], key.shape[2], causal, query.device)
        call = self._make_call(layer, query, key, value, causal)
        with torch.no_grad():
            for probe in self.probes:
                probe.begin_call(call)
        scale = kwargs.get("scaling")

        needs_probs = self.needs_probs or h2o
        received = torch.zeros(key.shape[0], key.shape[2], dtype=torch.float64, device=key.device) if h2o else None

        def observe(block: BlockView) -> None:
            detached = BlockView(probs=block.probs.detach(), logits=block.logits.detach(), keep=block.keep,
                                 q_index=block.q_index)
            with torch.no_grad():
                if received is not None:  # H2O: attention each cached key received, over heads and real queries
                    rows_valid = call.query_valid[:, block.q_index][:, None, :, None]
                    received[:, : detached.probs.shape[-1]] += (detached.probs * rows_valid).sum(dim=(1, 2)).double()
                for probe in self.probes:
                    if "probs" in probe.needs:
                        probe.update(call, detached)

        if edits:
            output = self._edited_attention(module, query, key, value, attention_mask, keep, call, edits, kwargs,
                                            observe, needs_probs, sample=not h2o)
        elif not needs_probs and softcap is None:
            self.paths[layer] = "sdpa"
            output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]
        elif self.query_fraction < 1 and softcap is None and not h2o:  # H2O scores need every query row
            self.paths[layer] = "sdpa+sampled_probs"
            output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]
            rows = _sample_rows(query.shape[2], self.query_fraction, query.device)
            with torch.no_grad():
                blocked_attention(query, key, value, keep, scale=scale, block_size=self.block_size,
                                  query_index=rows, on_block=observe)
        else:
            self.paths[layer] = "blocked_eager"
            output = blocked_attention(query, key, value, keep, scale=scale, softcap=softcap,
                                       block_size=self.block_size,
                                       on_block=observe if needs_probs else None)
            output = output.transpose(1, 2).contiguous()  # (B, Lq, Hq, Dv)
        if received is not None:
            self._token_cache.layers[layer].accumulate(received)
        with torch.no_grad():
            for probe in self.probes:
                probe.end_call(call)
        return output, None

    def _edited_attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, keep: Tensor | None, call: AttentionCall, edits: list[Edit],
                          kwargs: dict, observe: Any, needs_probs: bool, sample: bool) -> Tensor:
        """The attention call with this layer's edits; returns (B, Lq, Hq, Dv) and records the path."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = call.layer_idx
        scale = kwargs.get("scaling")
        scale = float(query.shape[-1] ** -0.5 if scale is None else scale)
        contexts = [self._edit_context(call, edit, scale, query.device) for edit in edits]
        edited = EditedCall(query, key, value, keep, edits=edits, contexts=contexts, scale=scale,
                            block_size=self.block_size, softcap=kwargs.get("softcap"))
        if self.verify_rows:
            with torch.no_grad():
                edited.verify(self.edit_records, self.verify_rows)
        else:
            for edit, ctx in zip(edits, contexts):
                record = self.edit_records[id(edit)]
                record.calls_touched += 1
                record.heads_touched.update((layer, int(h)) for h in ctx.heads.nonzero().flatten().tolist())

        def sdpa(query_: Tensor, key_: Tensor, value_: Tensor, keep_: Tensor | None) -> Tensor:
            mask = attention_mask if keep_ is None else keep_
            options = {**kwargs, "scaling": scale}
            return sdpa_attention_forward(module, query_, key_, value_, mask, **options)[0].transpose(1, 2)

        if edited.is_fast() and not needs_probs:
            self.paths[layer] = "sdpa+edits"
            output = edited.fast(sdpa)
        elif edited.is_fast() and self.query_fraction < 1 and sample:
            self.paths[layer] = "sdpa+edits+sampled_probs"
            output = edited.fast(sdpa)
            with torch.no_grad():
                edited.eager(on_block=observe, rows=_sample_rows(query.shape[2], self.query_fraction, query.device))
        elif self.flex and not needs_probs and edited.flex_ready():
            self.paths[layer] = "flex+edits"
            output = edited.flex()
        else:
            self.paths[layer] = "blocked_eager+edits"
            output = edited.eager(on_block=observe if needs_probs else None)
        return output.transpose(1, 2).contiguous()  # (B, Lq, Hq, Dv)

    @staticmethod
    def _edit_context(call: AttentionCall, edit: Edit, scale: float, device: torch.device) -> EditContext:
        return EditContext(
            layer_idx=call.layer_idx, num_heads=call.num_heads, num_kv_heads=call.num_kv_heads, q_len=call.q_len,
            kv_len=call.kv_len, query_positions=call.query_positions, key_positions=call.key_positions,
            query_valid=call.query_valid, key_valid=call.key_valid,
            heads=edit.head_selection(call.num_heads, device), scale=scale,
        )

    @staticmethod
    def _keep_mask(attention_mask: Tensor | None, q_len: int, kv_len: int, causal: bool,
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

    def _make_call(self, layer: int, query: Tensor, key: Tensor, value: Tensor, causal: bool) -> AttentionCall:
        B, Hq, Lq, _ = query.shape
        Lk = key.shape[2]
        sequence = self._sequence
        if sequence is None or sequence.valid.shape[0] != B:
            valid = torch.ones(B, Lk, dtype=torch.bool, device=query.device)
            sequence = SequenceInfo.from_mask(valid, None, self.num_sequences)
        length = sequence.valid.shape[1]
        if length < Lk:  # no usable token info (e.g. inputs_embeds of another length): every key is real
            sequence = SequenceInfo.from_mask(torch.ones(B, Lk, dtype=torch.bool, device=query.device), None,
                                              self.num_sequences)
            length = Lk
        index = self._token_cache.token_index(layer) if self._token_cache is not None else None
        if index is not None and index.shape[-1] == Lk:  # an attnlab cache policy says which tokens it kept
            index = index.to(sequence.valid.device)
            if length > int(index.max()):
                key_valid = sequence.valid.gather(1, index).to(query.device)
                key_positions = sequence.positions.gather(1, index).to(query.device)
            else:  # only the new tokens' mask is known: kept tokens are real, positions are token indices
                key_valid = torch.ones(B, Lk, dtype=torch.bool, device=query.device)
                key_positions = index.to(query.device)
        else:  # the keys are the last Lk tokens (a cache cropped to a window keeps the most recent ones)
            key_valid = sequence.valid[:, length - Lk :].to(query.device)
            key_positions = sequence.positions[:, length - Lk :].to(query.device)
        return AttentionCall(
            layer_idx=layer, num_heads=Hq, num_kv_heads=key.shape[1], q_len=Lq, kv_len=Lk, causal=causal,
            value=value.detach(), query_valid=key_valid[:, Lk - Lq:], key_valid=key_valid,
            query_positions=key_positions[:, Lk - Lq:], key_positions=key_positions, sequence=sequence,
        )

    # results ------------------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """All probes' long-format rows (see docs/results.md)."""
        return [row for probe in self.probes for row in probe.rows()]

    def extras(self, decode: Any = None) -> dict[str, Any]:
        """Per-probe extras keyed by probe name; ``decode(token_id) -> str`` labels token tables."""
        return {probe.name: probe.extras(decode) for probe in self.probes}

    def results(self) -> Any:
        """A pandas DataFrame with columns probe, statistic, layer, head, position, value (nullable Int64 ints)."""
        import pandas as pd

        frame = pd.DataFrame(self.rows(), columns=list(RESULT_COLUMNS))
        for column in ("layer", "head", "position"):
            frame[column] = frame[column].astype("Int64")
        return frame

    def merge(self, other: Session) -> None:
        """Add another session's probe states (same probes, same model shape) into this one."""
        if [p.name for p in self.probes] != [p.name for p in other.probes]:
            raise ConfigError("sessions with different probes cannot be merged")
        for mine, theirs in zip(self.probes, other.probes):
            mine.merge(theirs)
        self.num_sequences += other.num_sequences
        self.shape.max_len = max(self.shape.max_len, other.shape.max_len)
        for layer, path in other.paths.items():
            mine_path = self.paths.get(layer, path)
            self.paths[layer] = path if mine_path == path else f"{mine_path}|{path}"
        for layer, calls in other.calls_per_layer.items():
            self.calls_per_layer[layer] = self.calls_per_layer.get(layer, 0) + calls

    def edit_report(self) -> Any:
        """A pandas DataFrame, one row per edit: edit (name), spec, stage, path, calls_touched, heads_touched,
        forward_passes_touched (positions edits), max_change (the largest change of a per-head output the edit
        made on the sampled rows; NaN if not measured; for a positions edit only its mask part is measured, since
        the position ids are already in the query/key the attention call receives), identity (whether its
        parameters are the identity)."""
        import pandas as pd

        rows = []
        for edit in self.edits:
            record = self.edit_records[id(edit)]
            layers = sorted({layer for layer, _ in record.heads_touched})
            if edit.stage == "positions" and record.forward_passes_touched:
                # position ids feed RoPE in every layer: every (layer, head) is touched, not only the masked ones
                layers = list(range(self.shape.num_layers))
                touched = self.shape.num_layers * self.shape.num_heads
            else:
                touched = len(record.heads_touched)
            rows.append({
                "edit": edit.name, "spec": edit.spec(), "stage": edit.stage,
                "path": ",".join(sorted({self.paths[layer] for layer in layers if layer in self.paths})),
                "calls_touched": record.calls_touched, "heads_touched": touched,
                "forward_passes_touched": record.forward_passes_touched,
                "max_change": record.max_change if self.verify_rows and record.calls_touched else float("nan"),
                "identity": edit.is_identity(),
            })
        return pd.DataFrame(rows, columns=["edit", "spec", "stage", "path", "calls_touched", "heads_touched",
                                           "forward_passes_touched", "max_change", "identity"])

    def check_edits_fired(self) -> None:
        """Raise EditNotFiredError naming every requested edit that acted on no attention call."""
        silent = [edit.spec() for edit in self.edits if self.edit_records[id(edit)].calls_touched == 0
                  and self.edit_records[id(edit)].forward_passes_touched == 0]
        if silent:
            raise EditNotFiredError(
                f"edit(s) never fired: {', '.join(silent)} — no attention call passed through them (did the model "
                "run inside the session, and do their layers exist?)")

    def probe(self, name: str) -> Probe:
        """The probe instance named ``name`` in this session."""
        for probe in self.probes:
            if probe.name == name:
                return probe
        raise KeyError(f"no probe {name!r} in this session; it has {[p.name for p in self.probes]}")

