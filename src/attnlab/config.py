"""Composed, frozen run configurations: what a model, a text and a run each depend on, and their combinations.

Three specs hold the settings every command shares, one job each:

- :class:`ModelSpec`: which model and where (``model``, ``dtype``, ``device``, ``tokenizer``, ``device_map``);
- :class:`TextSpec`: which text and how it is cut into windows (``text``, ``seq_len``, ``max_windows``,
  ``batch_size``, ``bos``);
- :class:`RunSpec`: what a probe run does (``probes``, ``probe_args``, ``compare``, ``block_size``,
  ``query_fraction``, ``probe_kernel``, ``seed``, and the report viewer's ``pattern_heads``/``pattern_tokens``).

A command's config composes them: :class:`RunConfig` (``attnlab report`` / ``attnlab probe``) is
``load: ModelSpec`` + ``data: TextSpec`` + ``run: RunSpec`` + ``inputs: ImageTextSpec`` (images + prompts for a
vision-language model, instead of text windows); :class:`attnlab.evaluation.config.EvalConfig` is
``load`` + ``data`` + ``eval: EvalSpec``. Every composed config is built by field name from flat values, so the
CLI, a ``--config`` YAML and Python callers all use the same names::

    RunConfig(model="smollm2-135m", seq_len=256, probes=("entropy",))        # flat names, routed to their spec
    RunConfig(load=ModelSpec(dtype="float64"), data=TextSpec(seq_len=256))   # or whole specs

:func:`spec_values` is that one mapping: each key goes to the spec that has a field of that name (or whose
field's ``metadata["option"]`` is the CLI option's name, e.g. ``probe`` → ``probes``); ``None`` means "use the
default"; strings become 1-tuples for tuple fields (or go through ``metadata["parse"]``); paths become strings.
``to_dict()`` is flat (one key per field, the ``config`` object of results.json) and the constructor reads it back.
This module imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from attnlab.errors import ConfigError
from attnlab.params import INT_LIMIT  # lengths, counts, sizes: beyond it they overflow index tensors

DTYPE_NAMES = ("float32", "float64", "bfloat16", "float16")
SEED_LIMIT = 2**63 - 1  # torch.manual_seed takes a 64-bit seed
BOS_POLICIES = ("auto", "always", "never")
PROBE_KERNELS = ("fused", "blocked")  # Session(probe_kernel=...)
DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate computes these maps
_MAP_DEVICE = re.compile(r"(cpu|disk|mps|cuda(:\d+)?)")
_MAP_EXPECTED = ("expected device_map auto, balanced, balanced_low_0, sequential, a JSON file or an inline JSON "
                 "object of module name -> device such as '{\"model.embed_tokens\": 0, \"\": \"cpu\"}'")


def check_types(spec: Any, kinds: Mapping[str, type]) -> None:
    """ConfigError (one line) unless each named field holds a value of its kind (bool is not an int or float)."""
    for name, kind in kinds.items():
        value = getattr(spec, name)
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if not ok or isinstance(value, bool):
            raise ConfigError(f"{name} must be {kind.__name__}, got {value!r} ({type(value).__name__})")


def check_range(spec: Any, bounds: Mapping[str, tuple[int, int]]) -> None:
    """ConfigError (one line) unless each named int field (None skipped) lies in its inclusive ``(low, high)``."""
    for name, (low, high) in bounds.items():
        value = getattr(spec, name)
        if value is not None and not low <= value <= high:
            shown = value if abs(value) < 10**30 else "a larger number"
            raise ConfigError(f"{name} must be in [{low}, {high}], got {shown}")


def check_names(name: str, values: Any) -> None:
    """ConfigError unless ``values`` is a tuple/list of strings."""
    if isinstance(values, str) or not isinstance(values, (tuple, list)) or not all(isinstance(v, str)
                                                                                  for v in values):
        raise ConfigError(f"{name} must be a list of names, got {values!r}")


def parse_device_map(value: Any, *, read_file: bool = True) -> str | dict[str, int | str] | None:
    """A ``device_map`` setting (CLI ``--device-map``) → None, a map name, or ``{module name: device}``.

    ``value`` is None; one of :data:`DEVICE_MAP_NAMES` (accelerate computes the map from the free memory of every
    GPU, then CPU, then disk); a mapping; an inline JSON object (text starting with ``{``); or the path of a JSON
    file holding one. A map's keys are module names (``""`` = the whole model, ``"model.layers.3"`` …), its values
    a GPU index (int >= 0) or ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"cpu"`` (CPU offload) or ``"disk"`` (disk
    offload). Whether the modules exist is checked when the model loads
    (:func:`attnlab.capture.device_map.check_map_modules`). With ``read_file=False`` (a config being built, which
    may be built where the file is absent, e.g. on another node) a path is returned as given, unread; the file is
    read once, when the model loads.

    Raises:
        ConfigError: anything else (an unknown name, a missing file, bad JSON, an empty map, a bad device), one line.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip() in DEVICE_MAP_NAMES:
        return value.strip()
    where = "device_map"
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            if not read_file:
                return value
            if not os.path.isfile(text):
                raise ConfigError(f"{_MAP_EXPECTED}; got {value!r} (not a map name, and no such file)")
            where = f"device_map file {text}"
            try:
                text = Path(text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as error:
                raise ConfigError(f"cannot read {where}: {error}") from None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where} is not valid JSON ({error}); {_MAP_EXPECTED}") from None
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"{_MAP_EXPECTED}; {where} holds {json.dumps(value)[:80]}")
    for module, device in value.items():
        ok = isinstance(device, int) and not isinstance(device, bool) and device >= 0 or (
            isinstance(device, str) and _MAP_DEVICE.fullmatch(device) is not None)
        if not isinstance(module, str) or not ok:
            raise ConfigError(f"{where}: {module!r} -> {device!r}; expected module name -> GPU index (0, 1, ...), "
                              "\"cuda:N\", \"mps\", \"cpu\" or \"disk\"")
    return dict(value)


@dataclass(frozen=True)
class ModelSpec:
    """Which model, in which dtype, on which device.

    Attributes:
        model: bundled name (``attnlab models list``), local directory, ``.gguf`` file, or hub id.
        dtype: one of :data:`DTYPE_NAMES`; probs are always computed in float32.
        device: torch device string, e.g. ``"cpu"`` or ``"cuda:0"``.
        tokenizer: where the tokenizer comes from when not from the model (CLI ``--tokenizer``): a bundled model
            name, a local folder or ``.gguf`` file, or a hub id; None = the model's own.
        device_map: place the model's modules across devices with accelerate instead of on ``device`` (CLI
            ``--device-map``): a map name (``auto`` …), a JSON file or inline JSON object, or a mapping, as
            :func:`parse_device_map` reads it (kept as given; results.json's ``model.device_map`` records the map
            that was used). Needs ``device`` left at ``"cpu"``. An inline map is checked here (ConfigError); a
            map file only when the model loads.
    """

    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    tokenizer: str | None = None
    device_map: str | dict[str, int | str] | None = None

    def __post_init__(self) -> None:
        check_types(self, {"model": str, "dtype": str, "device": str})
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str) or not self.tokenizer):
            raise ConfigError(f"tokenizer must be a bundled name, a path or a hub id, got {self.tokenizer!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        parse_device_map(self.device_map, read_file=False)  # inline maps now; a map file when the model loads
        check_map_and_device(self.device_map, self.device)


def check_map_and_device(device_map: Any, device: Any) -> None:
    """ConfigError unless ``device`` is left at ``"cpu"`` when a ``device_map`` is given (the map places every
    module; inputs go to the device of the input embeddings)."""
    if device_map is not None and str(device) != "cpu":
        raise ConfigError(f"--device-map and --device {device} cannot be combined: the map places every module "
                          "(give a device in the map, e.g. '{\"\": \"cuda:1\"}', or drop --device-map)")


@dataclass(frozen=True)
class TextSpec:
    """Which text, cut into which windows.

    Attributes:
        text: path to a UTF-8 text file, or None for the bundled Shakespeare corpus.
        seq_len: tokens per window (BOS included when one is prepended); at most the model's max positions.
        max_windows: number of windows read from the text.
        batch_size: windows per forward pass (probe runs).
        bos: ``auto`` | ``always`` | ``never`` (see :mod:`attnlab.text`).
    """

    text: str | None = None
    seq_len: int = 512
    max_windows: int = 4
    batch_size: int = 1
    bos: str = "auto"

    def __post_init__(self) -> None:
        check_types(self, {"seq_len": int, "max_windows": int, "batch_size": int, "bos": str})
        if self.text is not None and not isinstance(self.text, str):
            raise ConfigError(f"text must be a path string, got {self.text!r}")
        check_range(self, {"seq_len": (2, INT_LIMIT), "max_windows": (1, INT_LIMIT), "batch_size": (1, INT_LIMIT)})


PATTERN_TOKENS_RANGE = (2, 256)
MAX_PATTERN_HEADS = 16


def parse_pattern_heads(value: str) -> tuple[tuple[int, int], ...] | None:
    """``--pattern-heads`` → None for ``"auto"`` and ``"none"``, else the ``(layer, head)`` pairs of ``"L.H,L.H"``.

    Raises ConfigError (one line, expected vs received) for anything else, a repeated pair, or more than
    :data:`MAX_PATTERN_HEADS` pairs. The layer/head ranges are checked against the model later
    (:func:`attnlab.capture.pattern_report.check_pattern_heads`).
    """
    expected = "expected pattern_heads 'auto', 'none' or a comma list of LAYER.HEAD such as '3.1,5.0'"
    if not isinstance(value, str):
        raise ConfigError(f"{expected}, got {value!r} ({type(value).__name__})")
    if value in ("auto", "none"):
        return None
    pairs = []
    for item in value.split(","):
        layer, dot, head = item.strip().partition(".")
        if not (dot and layer.isascii() and layer.isdigit() and head.isascii() and head.isdigit()):
            raise ConfigError(f"{expected}, got {value!r}")
        pairs.append((int(layer), int(head)))
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"{expected} (each head once), got {value!r}")
    if len(pairs) > MAX_PATTERN_HEADS:
        raise ConfigError(f"expected at most {MAX_PATTERN_HEADS} pattern heads, got {len(pairs)} in {value!r}")
    return tuple(pairs)


def _default_probes() -> tuple[str, ...]:
    from attnlab.probes import DEFAULT_PROBES

    return tuple(DEFAULT_PROBES)


def _parse_probe_args(value: Any) -> dict[str, dict[str, Any]]:
    """``--probe-arg`` items (``["cka.max_tokens=8"]``) or an already nested mapping → ``{probe: {key: value}}``."""
    if isinstance(value, Mapping):
        if not all(isinstance(v, Mapping) for v in value.values()):
            raise ConfigError(f"probe_args must map probe names to {{key: value}}, got {value!r}")
        return {str(k): dict(v) for k, v in value.items()}
    from attnlab.params import parse_probe_args

    return parse_probe_args([value] if isinstance(value, str) else list(value))


@dataclass(frozen=True)
class RunSpec:
    """What a probe run does.

    Attributes:
        probes: probe or analysis names (``attnlab ls probes``; CLI ``--probe``).
        probe_args: ``{name: {key: value}}`` constructor arguments (CLI ``--probe-arg NAME.KEY=VALUE``).
        compare: a second model (same tokenizer) for analyses that compare two models, or None.
        block_size: query rows per block of the eager kernel.
        query_fraction: fraction of query rows the probes see (1 = exact statistics).
        probe_kernel: ``"fused"`` (default) or ``"blocked"`` (the oracle), the Session's ``probe_kernel``
            (:class:`attnlab.capture.session.Session`); results.json's ``attention_paths`` say which kernel ran.
        seed: seeds python and torch RNGs, in [0, 2**63 - 1] (the forward pass is deterministic on CPU anyway).
        pattern_heads: heads whose per-token patterns the report's viewer shows (results.json ``"patterns"``):
            ``"auto"`` (strongest sinks + lowest entropy), ``"none"`` (no viewer data) or ``"L.H,L.H"`` (≤ 16).
        pattern_tokens: the viewer's tokens, the first of the first window, in [2, 256].
    """

    probes: tuple[str, ...] = field(default_factory=_default_probes, metadata={"option": "probe"})
    probe_args: dict[str, dict[str, Any]] = field(default_factory=dict,
                                                  metadata={"option": "probe_arg", "parse": _parse_probe_args})
    compare: str | None = None
    block_size: int = 128
    query_fraction: float = 1.0
    probe_kernel: str = "fused"
    seed: int = 0
    pattern_heads: str = "auto"
    pattern_tokens: int = 64

    def __post_init__(self) -> None:
        check_types(self, {"block_size": int, "query_fraction": float, "seed": int, "pattern_tokens": int})
        parse_pattern_heads(self.pattern_heads)
        low, high = PATTERN_TOKENS_RANGE
        if not low <= self.pattern_tokens <= high:
            raise ConfigError(f"expected pattern_tokens in {low}..{high}, got {self.pattern_tokens}")
        check_names("probes", self.probes)
        if self.compare is not None and not isinstance(self.compare, str):
            raise ConfigError(f"compare must be a model name or path, got {self.compare!r}")
        if not isinstance(self.probe_args, dict):
            raise ConfigError(f"probe_args must be a mapping, got {self.probe_args!r}")
        check_range(self, {"block_size": (1, INT_LIMIT), "seed": (0, SEED_LIMIT)})
        if not 0 < self.query_fraction <= 1:
            raise ConfigError(f"query_fraction must be in (0, 1], got {self.query_fraction}")
        if self.probe_kernel not in PROBE_KERNELS:
            raise ConfigError(f"probe_kernel must be 'fused' or 'blocked', got {self.probe_kernel!r}")
        if not self.probes:
            raise ConfigError("at least one probe is needed; see `attnlab ls probes`")
        for name in self.probes:
            probe_kind(name)  # raises RegistryError with a suggestion
        unused = sorted(set(self.probe_args) - set(self.probes))
        if unused:
            raise ConfigError(f"--probe-arg given for probe(s) not selected: {', '.join(unused)}")


CHAT_TEMPLATE_CHOICES = ("auto", "on", "off")
VLM_PROBES = ("role_attention", "visual_sinks")  # added to the default probes of a report on image inputs


@dataclass(frozen=True)
class ImageTextSpec:
    """Image + prompt inputs for a vision-language model (instead of text windows).

    Attributes:
        image: image files of one sequence (CLI ``--image``, repeatable), in order; needs ``prompt``. Image and
            manifest paths are made absolute (from the current directory), so a saved config replays anywhere.
        prompt: its prompt (CLI ``--prompt``). answer: text teacher-forced after it (``--answer``), or None.
        system: a system prompt (``--system``), or None.
        manifest: a JSONL file of items instead (CLI ``--manifest``;
            :func:`attnlab.capture.vlm_inputs.read_manifest`).
        chat_template: ``"auto"`` (the processor's chat template when it has one), ``"on"`` or ``"off"`` (plain
            ``<image>`` + prompt text).
    """

    image: tuple[str, ...] = ()
    prompt: str | None = None
    answer: str | None = None
    system: str | None = None
    manifest: str | None = None
    chat_template: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.image, (tuple, list)):  # CLI paths -> strings
            object.__setattr__(self, "image", tuple(os.fspath(p) if isinstance(p, os.PathLike) else p
                                                    for p in self.image))
        check_names("image", self.image)
        if self.manifest is not None and isinstance(self.manifest, os.PathLike):
            object.__setattr__(self, "manifest", os.fspath(self.manifest))
        # absolute paths, so results.json's config replays from any directory
        object.__setattr__(self, "image", tuple(os.path.abspath(os.path.expanduser(p)) for p in self.image))
        if isinstance(self.manifest, str):
            object.__setattr__(self, "manifest", os.path.abspath(os.path.expanduser(self.manifest)))
        for name in ("prompt", "answer", "system", "manifest"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.chat_template not in CHAT_TEMPLATE_CHOICES:
            raise ConfigError(f"chat_template must be one of {', '.join(CHAT_TEMPLATE_CHOICES)}, "
                              f"got {self.chat_template!r}")
        if self.manifest is not None and (self.image or self.prompt is not None):
            raise ConfigError("--manifest and --image/--prompt cannot be combined; put every item in the manifest")
        if self.image and self.prompt is None:
            raise ConfigError("--image needs --prompt TEXT (the question asked about the image)")
        if not self.image and self.manifest is None:
            given = [name for name in ("prompt", "answer", "system") if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"--{given[0]} needs --image PATH (or --manifest FILE) on a vision-language model; "
                                  "a diffusion model takes --prompt alone, with --model a diffusers pipeline folder "
                                  "(model_index.json) or a lab DiT folder (is the --model path right?)")

    @property
    def active(self) -> bool:
        """Whether the run reads images (``image`` or ``manifest`` given)."""
        return bool(self.image) or self.manifest is not None

    def items(self) -> list[Any]:
        """The :class:`attnlab.capture.vlm_inputs.ImageTextItem` list (the manifest's, or the one item of
        image/prompt/answer/system). ConfigError for a bad manifest, or an image file that is missing or whose
        header is not an image's."""
        from attnlab.capture.vlm_inputs import ImageTextItem, check_image, read_manifest

        if self.manifest is not None:
            items = read_manifest(self.manifest)
        else:
            items = [ImageTextItem(list(self.image), self.prompt or "", self.answer, self.system)]
        for path in dict.fromkeys(p for item in items for p in item.images):
            check_image(path)  # missing or not an image: fail before the model loads (reads the header only)
        return items

    @property
    def use_chat_template(self) -> bool | None:
        """``chat_template`` as build_batch takes it: None (auto), True or False."""
        return {"auto": None, "on": True, "off": False}[self.chat_template]


def default_probes(images: bool) -> tuple[str, ...]:
    """The report's default probes; on image inputs also :data:`VLM_PROBES` (those registered)."""
    from attnlab.analyses import probe_or_analysis
    from attnlab.errors import RegistryError

    names = _default_probes()
    for name in VLM_PROBES if images else ():
        try:
            probe_or_analysis(name)
        except RegistryError:  # not in this build (yet)
            continue
        names += (name,)
    return names


def probe_kind(name: str) -> str:
    """``"analysis"`` (a name in :data:`attnlab.analyses.ANALYSES`) or ``"attention"`` (a name in
    :data:`attnlab.probes.PROBES`). RegistryError (suggesting from both registries) if unknown."""
    from attnlab.analyses import probe_or_analysis
    from attnlab.analyses.base import Analysis

    return "analysis" if issubclass(probe_or_analysis(name), Analysis) else "attention"


def _coerce(spec_field: dataclasses.Field, value: Any) -> Any:
    """One option value → the field's form: parse strings where the field says how, tuples, path strings."""
    parse = spec_field.metadata.get("parse")
    default = spec_field.default_factory() if callable(spec_field.default_factory) else spec_field.default
    if parse is not None and (isinstance(value, (str, list, tuple)) or not isinstance(value, type(default))):
        return parse(value)
    if isinstance(default, tuple):
        return (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else value
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def spec_values(spec_type: type, values: dict[str, Any]) -> dict[str, Any]:
    """Pop from ``values`` the keys that name a field (or its CLI option) of ``spec_type``; return them coerced.

    ``None`` values are dropped (the field's default applies); see the module docstring for the coercions.
    """
    taken = {}
    for spec_field in dataclasses.fields(spec_type):
        for key in (spec_field.name, spec_field.metadata.get("option")):
            if key is not None and key in values:
                value = values.pop(key)
                if value is not None:
                    taken[spec_field.name] = _coerce(spec_field, value)
    return taken


class ComposedConfig:
    """Base of configs made of specs: build by field name, flat ``to_dict``, ``from_dict`` (see module docstring).

    Subclasses are ``@dataclass(frozen=True, init=False)`` whose fields are specs with ``default_factory`` set to
    the spec class. ``IGNORED`` names values the constructor accepts and drops (CLI-only options such as ``out``).
    """

    IGNORED: ClassVar[tuple[str, ...]] = ("out", "force", "config", "debug")

    def __init__(self, **values: Any) -> None:
        values = {key: value for key, value in values.items() if key not in self.IGNORED}
        for spec_field in dataclasses.fields(self):  # type: ignore[arg-type]
            spec_type = spec_field.default_factory
            spec = values.pop(spec_field.name, None)
            if spec is None:
                spec = spec_type(**spec_values(spec_type, values))  # type: ignore[operator]
            elif not isinstance(spec, spec_type):  # type: ignore[arg-type]
                raise ConfigError(f"{spec_field.name} must be a {spec_type.__name__}, got {spec!r}")  # type: ignore
            object.__setattr__(self, spec_field.name, spec)
        if values:
            known = sorted(self.option_names())
            raise ConfigError(f"unknown setting(s) {', '.join(sorted(values))}; known: {', '.join(known)}")
        self.__post_init__()

    def __post_init__(self) -> None:
        """Checks across specs (override)."""

    @classmethod
    def option_names(cls) -> set[str]:
        """Every flat name the constructor accepts (field names and their CLI option names)."""
        names = set()
        for spec_field in dataclasses.fields(cls):  # type: ignore[arg-type]
            for inner in dataclasses.fields(spec_field.default_factory):  # type: ignore[arg-type]
                names.update(n for n in (inner.name, inner.metadata.get("option")) if n)
        return names

    @classmethod
    def option_of_field(cls) -> dict[str, str]:
        """``{field name: CLI option name}`` where they differ (``probes`` → ``probe``, ``variants`` → ``edit``)."""
        return {inner.name: inner.metadata["option"] for spec_field in dataclasses.fields(cls)  # type: ignore
                for inner in dataclasses.fields(spec_field.default_factory)  # type: ignore[arg-type]
                if inner.metadata.get("option")}

    def to_dict(self) -> dict[str, Any]:
        """One flat, JSON-ready dict of every spec's fields (tuples as lists): results.json's ``config``."""
        data: dict[str, Any] = {}
        for spec_field in dataclasses.fields(self):  # type: ignore[arg-type]
            for key, value in dataclasses.asdict(getattr(self, spec_field.name)).items():
                data[key] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Inverse of :meth:`to_dict` (flat keys); ConfigError on unknown keys."""
        return cls(**dict(data))


@dataclass(frozen=True, init=False)
class RunConfig(ComposedConfig):
    """Everything a probe run (``attnlab report`` / ``attnlab probe``) depends on; saved in results.json.

    Build it from flat names (``RunConfig(model=..., seq_len=..., probes=(...))``) or from specs; read it as
    ``config.load.model``, ``config.data.seq_len``, ``config.run.probes``.
    """

    load: ModelSpec = field(default_factory=ModelSpec)
    data: TextSpec = field(default_factory=TextSpec)
    run: RunSpec = field(default_factory=RunSpec)
    inputs: ImageTextSpec = field(default_factory=ImageTextSpec)

    def __post_init__(self) -> None:
        if self.inputs.active and self.data.text is not None:
            raise ConfigError("--text and --image/--manifest cannot be combined; a run reads text or images")
        if self.inputs.active and self.run.pattern_heads not in ("auto", "none"):
            raise ConfigError("--pattern-heads needs text inputs: the report viewer's patterns are not drawn for "
                              "--image/--manifest runs; drop it")
