"""Session: run probes and edits inside any transformers model that uses the AttentionInterface.

    with Session(model, probes=["entropy", "sink", "distance", "norms"]) as session:
        for batch in windows:
            model(**batch)
    table = session.results()   # pandas DataFrame: probe, statistic, layer, head, position, value

On enter the session registers the "attnlab" backend, switches the model to it with
``model.set_attn_implementation`` and installs standard PyTorch hooks: a forward pre-hook on the model (to read the
2-D ``attention_mask`` and ``input_ids``, so padding never enters a statistic, and to set ``position_ids`` where
:mod:`attnlab.capture.positions` says so) and, when a probe needs hidden states, forward hooks on the decoder
layers. On exit (also on exceptions) it removes the hooks and restores the previous attention implementation.

Every attention call: the call record is built (:mod:`attnlab.capture.calls`), the planner picks a path
(:mod:`attnlab.capture.planner`, recorded per layer in ``session.attention_paths``) and its executor runs it
(:mod:`attnlab.capture.executors`); edits are counted and verified by :class:`attnlab.capture.edit_log.EditLog`.
Layers that compute their own attention (attnlab.lab models) show their implied map instead (:meth:`Session.implied`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from attnlab.capture.architectures import model_facts, transformer_blocks
from attnlab.capture.backend import ACTIVE_SESSION, BACKEND_NAME, ensure_registered
from attnlab.capture.block_sparse_path import block_form
from attnlab.capture.calls import (
    ForwardState, bound_probes, check_attention_kwargs, check_model_supported, implied_call, prepare_call, read_forward,
)
from attnlab.capture.edit_log import EditLog
from attnlab.capture.executors import EXECUTORS, Job, fused_fallback, fused_plan, observe_implied, probe_observer
from attnlab.capture.patterns import PatternProbe
from attnlab.capture.planner import CallFacts, EditFacts, Needs, Options, Path, Planner
from attnlab.capture.positions import PositionIds
from attnlab.capture.vlm import AttentionSwitch, RoleReader
from attnlab.columns import RESULT_COLUMNS
from attnlab.edits.base import Edit
from attnlab.errors import ConfigError, RegistryError
from attnlab.probes.base import Probe
from attnlab.registry import unknown_name_message

logger = logging.getLogger(__name__)


class Session:
    """Run probes on every attention call of ``model`` while the context is active.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention uses the AttentionInterface.
        probes: names (see ``attnlab ls probes``) or Probe instances; bound to ``session.facts``.
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
        probe_kernel: ``"fused"`` (default): exact probes whose statistics the fused kernel can accumulate
            (``entropy``, ``sink``, ``distance``) get them from
            :func:`attnlab.functional.fused_attention.fused_attention` in the pass that computes the output;
            calls it cannot serve (soft-capping, edits, sampled rows,
            bidirectional layers with ``distance``, gradients through the attention, or any other probe that reads
            probs) run the blocked kernel.
            ``"blocked"``: always the blocked kernel with per-block observers (the oracle the fused path is tested
            against). ``attention_paths`` says which kernel ran on each layer (``"fused"`` or ``"blocked_eager"``);
            a fallback's reason is logged once at INFO. CLI: ``--probe-kernel``.

    Attributes:
        facts: the model's :class:`attnlab.facts.ModelFacts`. attention_paths: layer → path value (the
            :class:`attnlab.capture.planner.Path` last run there; ``"a|b"`` after merging sessions that differ).
        calls_per_layer: attention calls seen per layer. num_sequences: sequences (batch rows) seen.

    Raises:
        UnsupportedModelError: the model does not route attention through the AttentionInterface.
        ConfigError: bad block_size / query_fraction / probe_kernel / edit layers. RegistryError: unknown probe or
            edit name.
        EditNotFiredError: on a clean exit, if an edit never acted on any attention call.
    """

    def __init__(self, model: nn.Module, probes: Iterable[str | Probe] = (), *, block_size: int = 128,
                 query_fraction: float = 1.0, edits: Iterable[str | Edit] = (), verify_rows: int = 16,
                 flex: bool = False, probe_kernel: Literal["fused", "blocked"] = "fused") -> None:
        check_model_supported(model)
        self._setup(model, model_facts(model), probes, edits, block_size=block_size, query_fraction=query_fraction,
                    verify_rows=verify_rows, flex=flex, probe_kernel=probe_kernel)
        self.positions = PositionIds(model, self.facts, self.edit_log)
        self._forward: ForwardState | None = None  # the forward pass in flight
        self._layer_of: dict[int, int] = {}  # id(attention module) -> layer, for modules without layer_idx
        self._hooks: list[Any] = []
        self._switch = AttentionSwitch(model)
        self._roles = RoleReader(model, self.facts)
        self._token: Any = None

    def _setup(self, model: nn.Module, facts: Any, probes: Iterable[str | Probe], edits: Iterable[str | Edit], *,
               block_size: int, query_fraction: float, verify_rows: int, flex: bool, probe_kernel: str) -> None:
        """What every session holds: options checked, probes bound to ``facts``, edits checked and logged."""
        if probe_kernel not in ("fused", "blocked"):
            raise ConfigError(f"probe_kernel must be 'fused' or 'blocked', got {probe_kernel!r}")
        self.probe_kernel = probe_kernel
        if block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {block_size}")
        if not 0 < query_fraction <= 1:
            raise ConfigError(f"query_fraction must be in (0, 1], got {query_fraction}")
        self.model, self.block_size, self.query_fraction, self.flex = model, block_size, query_fraction, flex
        self.facts = facts
        self.probes: list[Probe] = bound_probes(probes, self.facts)
        self.edit_log = EditLog(edits, self.facts, verify_rows)
        self.edits, self.verify_rows = self.edit_log.edits, verify_rows
        self.planner = Planner(Options(query_fraction=query_fraction, flex=flex))
        self.attention_paths: dict[int, str] = {}
        self.calls_per_layer: dict[int, int] = {}
        self.num_sequences = 0
        self.step: int | None = None  # the denoising step of the calls in flight (set_step), or None

    def set_step(self, step: int | None) -> None:
        """Tell the session which denoising step the next forward passes belong to (a diffusion language model's
        sampler calls it before each step); every call record then carries ``step`` and edits scheduled with
        ``steps=`` act only on their steps. None clears it. Raises ConfigError for a negative or non-int step."""
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ConfigError(f"step must be a non-negative int or None, got {step!r}")
        self.step = step
        self.edit_log.step = step

    # context management -------------------------------------------------------------------------------------
    def __enter__(self) -> Session:
        if ACTIVE_SESSION.get() is not None:
            raise ConfigError("another attnlab Session is already active in this context; sessions do not nest")
        ensure_registered()
        self._switch.enter(BACKEND_NAME)
        self._token = ACTIVE_SESSION.set(self)
        self._hooks.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._after_forward))
        probes_read = any("hidden_states" in p.needs for p in self.probes)
        edits_read = any(edit.needs_hidden_states and not edit.is_identity() for edit in self.edits)
        if probes_read or edits_read:
            layers = transformer_blocks(self.model)
            if layers is None:
                logger.warning("could not find the decoder layers of %s; hidden-state probes and edits will see "
                               "nothing", type(self.model).__name__)
            else:
                for index, layer in enumerate(layers):
                    if probes_read:
                        self._hooks.append(layer.register_forward_hook(self._layer_hook(index)))
                    if probes_read or any(edit.needs_hidden_states and edit.applies_to(index)
                                          and not edit.is_identity() for edit in self.edits):
                        self._hooks.append(layer.register_forward_pre_hook(self._layer_input_hook(index),
                                                                           with_kwargs=True))
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._token is not None:
            ACTIVE_SESSION.reset(self._token)
            self._token = None
        self._switch.exit()
        if exc_type is None:
            self.check_edits_fired()

    # hooks --------------------------------------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._forward, length = read_forward(args, kwargs, self.num_sequences, roles=self._roles)
        if self._forward is None:
            return None
        position_ids = self.positions(kwargs, self._forward.sequence, length)
        return None if position_ids is None else (args, {**kwargs, "position_ids": position_ids})

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._forward is not None:
            self.num_sequences += self._forward.sequence.valid.shape[0]
        self._forward = None

    def _layer_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            if self._forward is None or not isinstance(hidden, Tensor) or hidden.dim() != 3:
                return
            with torch.no_grad():
                for probe in self.probes:
                    if "hidden_states" in probe.needs:
                        probe.on_hidden_states(index, hidden.detach(), self._forward.sequence)
        return hook

    def _layer_input_hook(self, index: int) -> Any:
        """Record decoder layer ``index``'s input hidden states for edits that read them (``call.hidden_states``)."""
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if self._forward is not None and isinstance(hidden, Tensor) and hidden.dim() == 3:
                self._forward.hidden[index] = hidden.detach()
        return hook

    # the attention call -------------------------------------------------------------------------------------
    def _count_call(self, module: nn.Module) -> int:
        """The module's layer index (``layer_idx``, else order of first call), with its call counted."""
        layer_idx = getattr(module, "layer_idx", None)
        layer = layer_idx if isinstance(layer_idx, int) else self._layer_of.setdefault(id(module), len(self._layer_of))
        self.calls_per_layer[layer] = self.calls_per_layer.get(layer, 0) + 1
        return layer

    def attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, None]:
        """Called by the backend for every attention call; returns (output (B, Lq, Hq, Dv), None)."""
        layer = self._count_call(module)
        check_attention_kwargs(type(self.model).__name__, kwargs)
        forward, softcap = self._forward, kwargs.get("softcap")
        probes = self.probes + list(forward.probes) if forward is not None else self.probes
        needs, facts = Needs.of(p.needs for p in probes), CallFacts(softcap=softcap is not None)
        edits = self.edit_log.for_layer(layer)
        # identity edits do not choose the path (they are counted, not run): logits stay bit-identical to no edit
        path = None if self.edit_log.acting(layer) else self.planner.choose(needs, EditFacts(), facts)
        if path is Path.SDPA and not needs.value:  # no probe reads the record: transformers' own SDPA, untouched
            self.attention_paths[layer] = path.value
            if edits:  # only identity edits here: count them on the call record
                k, v, _, keep, call = prepare_call(module, layer, query, key, value, attention_mask, kwargs, forward,
                                                   self.num_sequences)
                self.edit_log.attention_call(query, k, v, keep, call, block_size=self.block_size, softcap=softcap)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        key, value, attention_mask, keep, call = prepare_call(module, layer, query, key, value, attention_mask, kwargs,
                                                              forward, self.num_sequences)
        if call.key_roles is None and self.facts.modality != "text" and any(
                edit.role_restricted for edit in edits):
            raise ConfigError(f"layer {layer}: the token roles of this forward are unknown (a decoding step without a "
                              "2-D attention_mask covering the cached tokens?), so queries=/keys= cannot be applied; "
                              "pass attention_mask or use attnlab.roles.given_roles")
        if self.step is not None:
            call = replace(call, step=self.step)
        return self._execute(module, query, key, value, attention_mask, kwargs, keep, call, probes, needs, facts,
                             path), None

    def _execute(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                 kwargs: dict[str, Any], keep: Tensor | None, call: Any, probes: list[Probe], needs: Needs,
                 facts: CallFacts, path: Path | None) -> Tensor:
        """Run one prepared call: probes begin, edits apply (counted and verified), the planned executor runs
        (``path``, or the planner's choice under the edits when None), probes end. Returns (B, Lq, Hq, Dv)."""
        layer = call.layer_idx
        with torch.no_grad():
            for probe in probes:
                probe.begin_call(call)
        edited = self.edit_log.attention_call(query, key, value, keep, call, block_size=self.block_size,
                                              softcap=kwargs.get("softcap"))
        path = path or self.planner.choose(needs, EditFacts.of(edited, self.flex), facts)
        job = Job(module, query, key, value, attention_mask, kwargs, keep, call, edited=edited,
                  observe=probe_observer(call, probes), block_size=self.block_size, query_fraction=self.query_fraction)
        if path is Path.BLOCKED_EAGER and self.probe_kernel == "fused":
            path = self._fused_or_blocked(job, probes)
        if path in (Path.SDPA_EDITS, Path.FLEX_EDITS, Path.BLOCKED_EAGER_EDITS) and block_form(job) is not None:
            path = Path.BLOCK_SPARSE_EDITS  # the one acting edit's mask is whole tiles: run only the kept ones
        self.attention_paths[layer] = path.value
        output = EXECUTORS[path](job)
        with torch.no_grad():
            for probe in probes:
                probe.end_call(call)
        return output

    def _fused_or_blocked(self, job: Job, probes: list[Probe]) -> Path:
        """``Path.FUSED`` (with ``job.fused`` set) when the fused kernel can serve this ``blocked_eager`` call, else
        ``Path.BLOCKED_EAGER``; the reason a fused plan cannot run is logged once at INFO."""
        plan = fused_plan(job.call, probes)
        if plan is None:
            return Path.BLOCKED_EAGER
        reason = fused_fallback(job)
        if reason is not None:
            if reason not in self.planner.logged:
                self.planner.logged.add(reason)
                logger.info("attention path blocked_eager instead of fused: %s", reason)
            return Path.BLOCKED_EAGER
        job.fused = plan
        return Path.FUSED

    def implied(self, module: nn.Module, attention_map: Any) -> tuple[None, None]:
        """Called by the backend for a layer that computes its own attention (``implied_map=``, attnlab.lab):
        probes read ``attention_map`` (an ImpliedMap); path ``"implied:<kind>"`` (the map's kind: softmax,
        normalised, proxy or signed), so results say which map a statistic came from. Under GQA
        (``facts.num_kv_heads`` < num_heads) the call record holds the de-expanded value (``implied_call``).
        ConfigError if an edit targets the layer."""
        layer = self._count_call(module)
        if self.edit_log.for_layer(layer):
            raise ConfigError(f"layer {layer} computes its own attention (path implied); edits act only on "
                              "softmax attention through the attention interface: pass layers= to skip it")
        self.attention_paths[layer] = f"{Path.IMPLIED.value}:{attention_map.kind}"
        probes = self.probes + list(self._forward.probes) if self._forward is not None else self.probes
        kv_heads = self.facts.num_kv_heads if attention_map.num_heads == self.facts.num_heads else None
        call = implied_call(layer, attention_map, self._forward, self.num_sequences, num_kv_heads=kv_heads)
        observe_implied(attention_map, call, probes, self.block_size)
        return None, None

    # results ------------------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """All probes' long-format rows (see docs/results.md)."""
        return [row for probe in self.probes for row in probe.rows()]

    def extras(self, decode: Any = None) -> dict[str, Any]:
        """Per-probe extras keyed by probe name; ``decode(token_id) -> str`` labels token tables."""
        return {probe.name: probe.extras(decode) for probe in self.probes}

    def results(self) -> Any:
        """A pandas DataFrame with the results.csv columns (variant empty outside eval; nullable Int64 ints)."""
        import pandas as pd

        frame = pd.DataFrame(self.rows(), columns=list(RESULT_COLUMNS))
        for column in ("layer", "head", "position"):
            frame[column] = frame[column].astype("Int64")
        return frame

    def merge(self, other: Session) -> None:
        """Add another session's probe states (same probes, same model) into this one."""
        if [p.name for p in self.probes] != [p.name for p in other.probes]:
            raise ConfigError("sessions with different probes cannot be merged")
        for mine, theirs in zip(self.probes, other.probes):
            mine.merge(theirs)
        self.num_sequences += other.num_sequences
        for layer, path in other.attention_paths.items():
            mine_path = self.attention_paths.get(layer, path)
            self.attention_paths[layer] = path if mine_path == path else f"{mine_path}|{path}"
        for layer, calls in other.calls_per_layer.items():
            self.calls_per_layer[layer] = self.calls_per_layer.get(layer, 0) + calls

    def edit_report(self) -> Any:
        """A pandas DataFrame, one row per edit (see :meth:`attnlab.capture.edit_log.EditLog.report`)."""
        return self.edit_log.report(self.attention_paths)

    def check_edits_fired(self) -> None:
        """Raise EditNotFiredError naming every requested edit that acted on no attention call."""
        self.edit_log.check_fired()

    def patterns(self, tokenizer: Any = None) -> list[Any]:
        """The :class:`attnlab.capture.patterns.AttentionPattern` of every forward pass, in order, recorded by the
        session's PatternProbe(s) (``Session(model, probes=[PatternProbe(layers=[3], heads=[0, 1])])``), each with
        this session's attention paths; ``tokenizer`` decodes their tokens. ConfigError without a PatternProbe."""
        recorders = [probe for probe in self.probes if isinstance(probe, PatternProbe)]
        if not recorders:
            raise ConfigError("this session has no PatternProbe; pass probes=[PatternProbe(layers=..., heads=...)] "
                              "or use attnlab.attention_pattern")
        return [pattern for probe in recorders for pattern in probe.patterns(self.attention_paths, tokenizer)]

    def probe(self, name: str) -> Probe:
        """The probe instance named ``name`` in this session; RegistryError (a KeyError) naming the others."""
        by_name = {probe.name: probe for probe in self.probes}
        if name not in by_name:
            raise RegistryError(unknown_name_message("probe in this session", name, list(by_name)))
        return by_name[name]
