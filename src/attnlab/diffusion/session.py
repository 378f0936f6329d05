"""DiffusionSession: the same probes and edits inside a diffusers transformer, per denoising step.

    with DiffusionSession(pipe.transformer, probes=["entropy", "role_attention"], edits=["temperature:tau=0.9"]) as s:
        pipe(prompt, num_inference_steps=20)
    s.results()        # long format with a denoising_step column
    s.layer_table()    # layer → block, kind (self | cross | joint), module name

Layers are the model's attention modules in ``named_modules()`` order: a PixArt block holds two (self, then cross
attention), a Flux double block one joint attention. On enter the session wraps every attention module's processor
(:mod:`attnlab.diffusion.processor`, through ``module.set_processor``, diffusers' own extension point) and adds a
forward pre-hook on the transformer that reads the forward's latent layout and timestep
(:mod:`attnlab.diffusion.layout`); on exit (also on exceptions) it removes the hook and puts the original
processors back.

Denoising steps: the step counter starts at 0 and goes up whenever a forward's timestep differs from the previous
forward's; a timestep higher than the previous one starts a new sample (step 0). Classifier-free guidance run as
two forwards (or one doubled batch) at the same timestep is one step. ``set_step(i)`` fixes the step instead
(then the timesteps are not read). With ``per_step=True`` (default) each step gets its own probe states, so every
result row carries its ``denoising_step``; edits scheduled with ``steps=`` act on their steps only.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from attnlab.capture.backend import ACTIVE_SESSION
from attnlab.capture.planner import CallFacts, EditFacts, Needs, Path
from attnlab.capture.session import Session
from attnlab.columns import DENOISING_STEP_COLUMN, RESULT_COLUMNS
from attnlab.diffusion.layout import LatentLayout, call_kind, call_layout, call_roles, latent_layout
from attnlab.diffusion.processor import keep_from_mask, sdpa_arguments, wrap_processor
from attnlab.edits.base import Edit
from attnlab.errors import ConfigError, UnsupportedModelError
from attnlab.facts import ModelFacts
from attnlab.probes.base import AttentionCall, Probe, SequenceInfo

ROPE_MODELS = ("flux", "wan", "hunyuan", "ltx", "cogvideo", "mochi", "sana", "qwenimage", "hidream", "lumina")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every diffusers attention module (it has a ``processor`` and ``set_processor``), in
    ``named_modules()`` order: attnlab's layers of a diffusion model."""
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "set_processor") and getattr(module, "processor", None) is not None]


def is_diffusers_model(model: Any) -> bool:
    """True for a diffusers ``ModelMixin`` (a transformer or UNet) with at least one attention module."""
    try:
        from diffusers import ModelMixin
    except ImportError:  # diffusers not installed
        return False
    return isinstance(model, ModelMixin) and bool(attention_modules(model))


BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")
"""Top-level block lists of diffusers transformers (DiT/PixArt/SD3/Flux; Flux's single blocks; Wan)."""


def block_numbers(names: list[str]) -> list[int | None]:
    """The transformer block of each attention module name, numbered in order of appearance: the top-level
    :data:`BLOCK_LISTS` entries (``transformer_blocks.3``, ``single_transformer_blocks.0``, ``blocks.7``) when the
    model has them, other attention modules (a text refiner's) getting None; otherwise every name's prefix up to
    its first numeric component."""
    pattern = r"((?:%s)\.\d+)(\.|$)" % "|".join(BLOCK_LISTS)
    top_level = any(re.match(pattern, name) for name in names)
    prefixes: dict[str, int] = {}
    numbers: list[int | None] = []
    for name in names:
        match = re.match(pattern if top_level else r"(.*?\.\d+)(\.|$)", name)
        if match is None and top_level:
            numbers.append(None)
            continue
        prefix = match.group(1) if match else name
        numbers.append(prefixes.setdefault(prefix, len(prefixes)))
    return numbers


def diffusion_facts(model: nn.Module, modules: list[nn.Module]) -> ModelFacts:
    """:class:`attnlab.facts.ModelFacts` of a diffusers transformer: one layer per attention module, its heads and
    head_dim (``heads``, ``inner_dim``), ``causal=False``, ``modality="diffusion"``.

    Raises:
        UnsupportedModelError: the attention modules differ in head count or head width (UNets)."""
    shapes = set()
    for module in modules:
        heads = int(getattr(module, "heads", 0))
        inner = int(getattr(module, "inner_dim", 0) or 0)
        kv_heads = int(getattr(module, "kv_heads", None) or heads)
        shapes.add((heads, kv_heads, inner // heads if heads else 0))
    if len(shapes) != 1 or next(iter(shapes))[0] < 1 or next(iter(shapes))[2] < 1:
        raise UnsupportedModelError(f"{type(model).__name__}: attnlab needs every attention module to have the same "
                                    f"heads and head_dim, got (heads, kv_heads, head_dim) = {sorted(shapes)}")
    heads, kv_heads, head_dim = next(iter(shapes))
    name = type(model).__name__
    parameter = next(model.parameters(), None)
    return ModelFacts(num_layers=len(modules), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      hidden_size=heads * head_dim, causal=False, model_type=name,
                      position_embedding="rope" if any(key in name.lower() for key in ROPE_MODELS) else "absolute",
                      class_name=name, dtype=None if parameter is None else str(parameter.dtype).replace("torch.", ""),
                      device=None if parameter is None else str(parameter.device), modality="diffusion")


class DiffusionSession(Session):
    """Run probes and edits on every attention call of a diffusers transformer while the context is active.

    Args:
        model: a diffusers model (``pipe.transformer``): DiT, PixArt, SD3, Flux, Wan and other transformers whose
            attention processors call torch SDPA (directly or through diffusers' dispatcher).
        probes, edits, block_size, query_fraction, verify_rows, flex, probe_kernel: as :class:`Session`.
            Edits take ``steps=`` (denoising steps) besides ``layers=`` (attention modules, see
            :meth:`layer_table`), ``heads=``, ``queries=``/``keys=`` (roles ``image`` = patches, ``text``).
        per_step: keep one probe state per denoising step (rows carry ``denoising_step``); False sums all steps.
        text_first: in joint attention, whether text tokens come before the patches; None decides by the model
            (Flux and its single blocks: text first; SD3-style joint processors: patches first).

    Raises:
        UnsupportedModelError: not a diffusers model with attention modules, or modules of different sizes.
        ConfigError: a probe that reads decoder hidden states, an edit that remaps position ids, or the options of
            :class:`Session`.
    """

    def __init__(self, model: nn.Module, probes: Iterable[str | Probe] = (), *, edits: Iterable[str | Edit] = (),
                 per_step: bool = True, text_first: bool | None = None, block_size: int = 128,
                 query_fraction: float = 1.0, verify_rows: int = 16, flex: bool = False,
                 probe_kernel: Literal["fused", "blocked"] = "fused") -> None:
        if not is_diffusers_model(model):
            raise UnsupportedModelError(f"{type(model).__name__} is not a diffusers model with attention modules; "
                                        "DiffusionSession takes pipe.transformer (DiT, PixArt, SD3, Flux, Wan, …)")
        named = attention_modules(model)
        self.module_names = [name for name, _ in named]
        self._modules = [module for _, module in named]
        self._blocks = block_numbers(self.module_names)
        self._setup(model, diffusion_facts(model, self._modules), probes, edits, block_size=block_size,
                    query_fraction=query_fraction, verify_rows=verify_rows, flex=flex, probe_kernel=probe_kernel)
        for probe in self.probes:
            if "hidden_states" in probe.needs:
                raise ConfigError(f"probe {probe.name!r} reads decoder hidden states; a DiffusionSession feeds "
                                  "probes the attention calls only")
        for edit in self.edits:
            if edit.remaps_positions():
                raise ConfigError(f"edit {edit.spec()!r} remaps position ids, which diffusion transformers do not take")
        self.per_step, self.text_first = per_step, text_first
        self.timesteps: dict[int, float | None] = {}  # step → the timestep its first forward passed
        self.samples = 0  # samples started (a timestep above the previous one starts a new one)
        self.kinds: dict[int, str | None] = {}  # layer → kind of its last call
        self._step_probes: dict[int, list[Probe]] = {}
        self._latent: LatentLayout | None = None
        self._last_timestep: float | None = None
        self._manual_step = False
        self._originals: list[Any] = []
        self._hooks: list[Any] = []
        self._token: Any = None

    # context management -------------------------------------------------------------------------------------
    def __enter__(self) -> DiffusionSession:
        if ACTIVE_SESSION.get() is not None:
            raise ConfigError("another attnlab Session is already active in this context; sessions do not nest")
        self._token = ACTIVE_SESSION.set(self)
        self._originals = [module.processor for module in self._modules]
        for layer, module in enumerate(self._modules):
            module.set_processor(wrap_processor(module.processor, self, layer))
        self._hooks.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._after_forward, with_kwargs=True))
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module, original in zip(self._modules, self._originals):
            module.set_processor(original)
        self._originals = []
        if self._token is not None:
            ACTIVE_SESSION.reset(self._token)
            self._token = None
        if exc_type is None:
            self.check_edits_fired()

    # steps --------------------------------------------------------------------------------------------------
    def set_step(self, step: int | None, timestep: float | None = None) -> None:
        """Fix the denoising step of the next forwards (None returns to reading timesteps). ConfigError for a
        negative or non-int step."""
        super().set_step(step)
        self._manual_step = step is not None
        if step is not None:
            self.timesteps.setdefault(step, timestep)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._latent = latent_layout(getattr(module, "config", None), args, kwargs)
        if self._manual_step:
            return
        timestep = self._latent.timestep
        step = 0 if self.step is None else self.step
        if timestep is not None and self._last_timestep is not None:
            if timestep > self._last_timestep:
                step, self.samples = 0, self.samples + 1
            elif timestep < self._last_timestep:
                step += 1
        elif self.step is None:
            self.samples += 1
        self._last_timestep = timestep if timestep is not None else self._last_timestep
        super().set_step(step)
        self.timesteps.setdefault(step, timestep)

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.num_sequences += hidden.shape[0] if isinstance(hidden, Tensor) else 0

    def _probes_now(self) -> list[Probe]:
        """The probe states the calls in flight feed: the current step's (copies of the never-fed ``self.probes``,
        made on first use; a call outside any transformer forward counts as step 0) or, without ``per_step``,
        ``self.probes`` themselves."""
        if not self.per_step:
            return self.probes
        step = self.step or 0
        if step not in self._step_probes:
            self._step_probes[step] = [copy.deepcopy(probe) for probe in self.probes]
        return self._step_probes[step]

    # the attention call -------------------------------------------------------------------------------------
    def sdpa_call(self, module: nn.Module, layer: int, encoder: bool, *args: Any, **kwargs: Any) -> Tensor | None:
        """Called by the attnlab processor for the SDPA call of attention module ``layer`` with SDPA's arguments
        (``encoder``: the module was handed encoder states, see :func:`attnlab.diffusion.layout.call_layout`);
        returns the output (B, H, Lq, Dv), or None to let SDPA run as the model asked (nothing to observe or
        change: the output is then bit-identical to a run without the session)."""
        sdpa = sdpa_arguments(*args, **kwargs)
        query, key, value = sdpa["query"], sdpa["key"], sdpa["value"]
        if sdpa["dropout_p"] and module.training:
            raise ConfigError("attnlab probes need the model in eval mode (attention dropout is active); call "
                              "model.eval()")
        self.calls_per_layer[layer] = self.calls_per_layer.get(layer, 0) + 1
        probes = self._probes_now()
        needs, facts = Needs.of(p.needs for p in probes), CallFacts()
        acting = self.edit_log.acting(layer)
        path = None if acting else self.planner.choose(needs, EditFacts(), facts)
        untouched = path is Path.SDPA and not needs.value
        if untouched and not self.edit_log.for_layer(layer):
            self.attention_paths[layer] = path.value
            self.kinds[layer] = call_kind(self._latent, query.shape[2], key.shape[2], encoder)  # no role tensors
            return None
        keep, call = self._call_record(module, layer, encoder, query, key, value, sdpa)
        if untouched:  # only identity edits: count them on the record, let SDPA run
            self.edit_log.attention_call(query, key, value, keep, call, block_size=self.block_size, softcap=None)
            self.attention_paths[layer] = path.value
            return None
        if any(edit.role_restricted for edit in self.edit_log.for_layer(layer)) and call.key_roles is None:
            raise ConfigError(f"layer {layer}: the token layout of this call is unknown (query/key lengths fit no "
                              "patch/text rule), so queries=/keys= cannot be applied")
        job_kwargs = {"is_causal": bool(sdpa["is_causal"]), "scaling": call.scale, "dropout": 0.0}
        output = self._execute(module, query, key, value, keep, job_kwargs, keep, call, probes, needs, facts, path)
        return output.transpose(1, 2)

    def _text_first(self, module: nn.Module) -> bool:
        if self.text_first is not None:
            return self.text_first
        return "flux" in type(module).__name__.lower() or "flux" in type(self.model).__name__.lower()

    def _call_record(self, module: nn.Module, layer: int, encoder: bool, query: Tensor, key: Tensor, value: Tensor,
                     sdpa: dict[str, Any]) -> tuple[Tensor | None, AttentionCall]:
        """The keep mask and the call record of one SDPA call (roles, kind, grid, step, block)."""
        batch, heads, q_len, head_dim = query.shape
        kv_len, device = key.shape[2], query.device
        layout = call_layout(self._latent, q_len, kv_len, self._text_first(module), encoder)
        self.kinds[layer] = layout.kind
        keep = keep_from_mask(sdpa["attn_mask"], batch, q_len, kv_len)
        key_valid = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
        if keep is not None:
            key_valid = keep.any(dim=2).any(dim=1)
        grid = None if self._latent is None else self._latent.grid
        roles = call_roles(layout, grid if layout.kind else None, batch)
        positions = torch.arange(kv_len, device=device).expand(batch, -1)
        sequence = SequenceInfo(valid=key_valid, positions=positions, input_ids=None,
                                sequence_offset=self.num_sequences, roles=roles)
        scale = sdpa["scale"]
        call = AttentionCall(
            layer_idx=layer, num_heads=heads, num_kv_heads=key.shape[1], q_len=q_len, kv_len=kv_len,
            causal=bool(sdpa["is_causal"]), scale=float(head_dim ** -0.5 if scale is None else scale),
            value=value.detach(), query_valid=torch.ones(batch, q_len, dtype=torch.bool, device=device),
            key_valid=key_valid, query_positions=torch.arange(q_len, device=device).expand(batch, -1),
            key_positions=positions, sequence=sequence,
            query_roles=None if layout.query_roles is None else layout.query_roles.to(device).expand(batch, -1),
            key_roles=None if layout.key_roles is None else layout.key_roles.to(device).expand(batch, -1),
            step=self.step, kind=layout.kind, grid=grid if layout.kind else None, block=self._blocks[layer])
        return keep, call

    # results ------------------------------------------------------------------------------------------------
    def layer_table(self) -> Any:
        """A pandas DataFrame, one row per attnlab layer: ``layer``, ``block`` (transformer block index), ``kind``
        (self | cross | joint as its last call showed, None before any call or when unknown), ``module`` (name)."""
        import pandas as pd

        return pd.DataFrame({"layer": range(len(self.module_names)), "block": self._blocks,
                             "kind": [self.kinds.get(layer) for layer in range(len(self.module_names))],
                             "module": self.module_names})

    def probes_at(self, step: int) -> list[Probe]:
        """The probe states of denoising step ``step`` (per-step sessions); ConfigError if the step never ran."""
        if not self.per_step:
            raise ConfigError("this session sums all steps (per_step=False); use merged_probes()")
        if step not in self._step_probes:
            raise ConfigError(f"step {step} did not run; steps run: {sorted(self._step_probes)}")
        return self._step_probes[step]

    def merged_probes(self) -> list[Probe]:
        """The probe states summed over every denoising step (``self.probes`` when ``per_step`` is False)."""
        if not self.per_step or not self._step_probes:
            return self.probes
        merged = [copy.deepcopy(probe) for probe in self.probes]  # never fed in per-step mode
        for probes in self._step_probes.values():
            for mine, theirs in zip(merged, probes):
                mine.merge(theirs)
        return merged

    def rows(self, per_step: bool = True) -> list[dict[str, Any]]:
        """Long-format rows; with ``per_step`` (and a per-step session) each carries ``denoising_step``."""
        if not (per_step and self.per_step and self._step_probes):
            return [row for probe in self.merged_probes() for row in probe.rows()]
        return [{**row, DENOISING_STEP_COLUMN: step} for step, probes in sorted(self._step_probes.items())
                for probe in probes for row in probe.rows()]

    def results(self, per_step: bool = True) -> Any:
        """A pandas DataFrame with the results.csv columns plus ``denoising_step`` (Int64) when per step."""
        import pandas as pd

        rows = self.rows(per_step)
        columns = list(RESULT_COLUMNS) + ([DENOISING_STEP_COLUMN] if rows and DENOISING_STEP_COLUMN in rows[0] else [])
        frame = pd.DataFrame(rows, columns=columns)
        for column in ("layer", "head", "position", DENOISING_STEP_COLUMN):
            if column in frame:
                frame[column] = frame[column].astype("Int64")
        return frame

    def extras(self, decode: Any = None) -> dict[str, Any]:
        """Per-probe extras (summed over steps), keyed by probe name."""
        return {probe.name: probe.extras(decode) for probe in self.merged_probes()}

    def probe(self, name: str) -> Probe:
        """The probe named ``name`` with its state summed over steps; RegistryError naming the others."""
        by_name = {probe.name: probe for probe in self.merged_probes()}
        if name not in by_name:
            return super().probe(name)
        return by_name[name]

    def merge(self, other: Session) -> None:
        """Not supported yet (diffusion runs are not sharded): raises ConfigError."""
        raise ConfigError("DiffusionSession.merge is not supported; run one session per process")
