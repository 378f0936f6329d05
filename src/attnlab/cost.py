"""The Kinetics cost model: compute and memory traffic of generation, and the time they predict.

Source: Sadhukhan, Chen et al. 2025, "Kinetics: Rethinking Test-Time Scaling Laws" (arXiv 2506.05333), the cost
model of its released code (``cost_model/utils.py``; METHODS.md #17, high confidence for the formulas). Notation:
P parameters, L_in prompt tokens, L_out generated tokens per sample, N samples (best-of-N), n_q / n_kv query / key-
value heads, d = head_dim × num_layers (the layers folded into the head dim), I = peak FLOP/s ÷ memory bandwidth.

- **dense**: FLOPs ``N·[2·P·L_out + 2·(2·L_in + L_out)·L_out·n_q·d]`` (the weights, then QKᵀ and AV over the growing
  context); bytes ``kv_bytes·(2·L_in + N·L_out)·L_out·n_kv·d`` (K and V of the shared prompt read once per decode
  step for all samples, each sample's own K and V read by it alone).
- **topk** (block top-k sparse attention, the paper's proposal): KV budget ``B = local + block_size·top_k`` and
  effective KV factor ``K = B·L_out − ½·max(0, B − L_in)²``; FLOPs ``N·[2·P·L_out + 4·K·n_q·d + S]`` with the block
  search ``S = ⌊(2·L_in + L_out)/block_size⌋·L_out·n_q·d``; bytes ``kv_bytes·2·K·n_kv·d·N`` (K and V of the kept
  keys) plus the block representatives ``kv_bytes/2·⌊(2·L_in + N·L_out)/block_size⌋·L_out·n_kv·d`` (with bf16 these
  are the code's ``4·K·n_kv·d·N`` and ``⌊…⌋·L_out·n_kv·d``).
  (The code's "zero-overhead" variant adds ½·max(·)²; METHODS.md reads it as a sign slip and uses −, as here.)
  ``B`` is capped at ``L_in + L_out``: past it the formula would go negative, and every key is kept anyway (then
  ``K`` is the dense count ``(2·L_in + L_out)·L_out/2``).
- **sliding_window** (attnlab's entry, no search): the topk formulas with ``B = window``, no search and no
  representatives.
- **linear** (attnlab's entry, not in Kinetics): a recurrent state of ``n_q·head_dim·head_dim`` per layer and
  sample; each token updates and reads it: FLOPs ``N·[2·P·L_out + 4·L_out·n_q·head_dim·d]``, bytes
  ``state_bytes·2·N·L_out·n_q·head_dim·d`` (read and write), plus the prompt's prefill scan ignored as in Kinetics.
- Weight loads are left out, as in Kinetics (amortised by batching); ``weight_bytes`` adds ``weight_bytes·P·L_out·N``
  (every sample decoded on its own, batch 1, reading every weight once per decode step: the regime of a CPU), or
  ``weight_bytes·P·L_out`` with ``batched=True`` (the N samples decoded as one batch share each weight read).

``eFLOPs = FLOPs + I·bytes``; the predicted time is ``eFLOPs / peak = FLOPs/peak + bytes/bandwidth``.
:func:`prefill_cost` is attnlab's addition for the prompt pass (Kinetics leaves prefill out), used to validate the
model on measured generation (``benchmarks/cost_validation.py``, docs/benchmarks.md).
Every quantity here is a plain number (no torch, except :func:`measure_accelerator`, which times this machine, and
:func:`model_from_config`);
:func:`sizes_of` reads the sizes of a loaded model (or a :class:`ModelFacts` and a parameter count);
:func:`model_from_config` builds a weightless model from a config.json for it; :data:`MODEL_FAMILIES` holds the sizes
of two public model families (SmolLM2, Qwen3) typed from their configs (:func:`family_sizes`: ``"qwen3-8b"``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from attnlab.errors import ConfigError, UsageError

__all__ = ["ACCELERATORS", "MODEL_FAMILIES", "Accelerator", "Cost", "ModelSizes", "attention_cost", "cost_table",
           "family_names", "family_sizes", "llama_parameters", "measure_accelerator", "model_from_config",
           "prefill_cost", "sizes_of"]


@dataclass(frozen=True)
class Accelerator:
    """Peak compute (FLOP/s, dense, in the dtype the KV is stored in) and memory bandwidth (bytes/s) of a device."""

    name: str
    peak_flops: float
    bandwidth: float
    note: str = ""

    @property
    def intensity(self) -> float:
        """I = peak_flops / bandwidth, in FLOPs per byte (Kinetics' arithmetic intensity)."""
        return self.peak_flops / self.bandwidth


ACCELERATORS: dict[str, Accelerator] = {
    "b200": Accelerator("b200", 4.5e15, 8.0e12, "FP8 dense 4.5 PFLOP/s, HBM3e 8 TB/s: I = 562.5, Kinetics' setting"),
    "h100": Accelerator("h100", 989.4e12, 3.35e12, "SXM, BF16 dense 989 TFLOP/s, HBM3 3.35 TB/s (datasheet)"),
    "h200": Accelerator("h200", 989.4e12, 4.8e12, "SXM, BF16 dense 989 TFLOP/s, HBM3e 4.8 TB/s (datasheet)"),
    "cpu2": Accelerator("cpu2", 354e9, 27.4e9, "the reference 2-core Xeon VM, float32, 2 threads: median of the "
                        "9 measure_accelerator() calls (2048² matmul, 256 MiB matvec) of the validation run, "
                        "docs/benchmarks.md; a busy neighbour halves both"),
}
"""Named accelerators: datasheet numbers for the GPUs; ``cpu2`` is the reference 2-core CPU of docs/benchmarks.md,
measured by :func:`measure_accelerator` (another CPU: measure it, ``attnlab cost --measure``)."""


def measure_accelerator(*, matmul_size: int = 2048, stream_mib: int = 256, repeats: int = 5,
                        name: str = "measured") -> Accelerator:
    """This machine's float32 peak FLOP/s and memory read bandwidth, with torch's current thread count.

    Peak: the best of ``repeats`` timed ``(n, n) @ (n, n)`` float32 matmuls (2·n³ FLOPs each, after two warm-ups).
    Bandwidth: the best of ``repeats`` timed matrix-vector products ``F.linear(x, W)`` with a ``stream_mib`` MiB
    float32 ``W`` of 1024 columns (bytes of ``W`` read / s: the kernel of batch-1 decoding, which reads every weight
    once per token; pick a size well past the last-level cache). A plain sum and a copy (read + write) of the same
    bytes go into the note. Best-of, not median: the peak a kernel can reach, as datasheet numbers are.

    Raises ConfigError for a size or repeat count below 1. Imports torch (the rest of the module does not).
    """
    import time

    import torch
    import torch.nn.functional as F

    size, mib, count = (_positive("matmul_size", matmul_size), _positive("stream_mib", stream_mib),
                        _positive("repeats", repeats))

    def best(fn) -> float:
        fn(), fn()
        times = []
        for _ in range(count):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    a, b = torch.randn(size, size), torch.randn(size, size)
    peak = 2.0 * size**3 / best(lambda: a @ b)
    columns = 1024
    matrix = torch.randn(max(1, mib * 2**20 // (4 * columns)), columns)  # (rows, 1024) float32
    vector, target = torch.randn(1, columns), torch.empty_like(matrix)
    nbytes = matrix.numel() * 4
    read = nbytes / best(lambda: F.linear(vector, matrix))
    summed = nbytes / best(matrix.sum)
    copy = 2 * nbytes / best(lambda: target.copy_(matrix))
    threads = torch.get_num_threads()
    note = (f"measured: float32 {size}² matmul {peak / 1e9:.1f} GFLOP/s; {mib} MiB matvec read {read / 1e9:.2f} GB/s "
            f"(sum {summed / 1e9:.2f}, copy {copy / 1e9:.2f} read + write); {threads} thread{'s' * (threads != 1)}")
    return Accelerator(name, peak, read, note)


@dataclass(frozen=True)
class ModelSizes:
    """What the cost model reads of a model: parameters, layers, query and key-value heads, head_dim."""

    num_parameters: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def folded_dim(self) -> int:
        """d = head_dim × num_layers (Kinetics folds the layers into the head dim)."""
        return self.head_dim * self.num_layers


def llama_parameters(*, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                     num_kv_heads: int, head_dim: int, vocab_size: int, tied_embeddings: bool) -> int:
    """Parameters of a Llama-style decoder (no biases; q/k/v/o, gated MLP, two RMSNorms per layer, a final norm):
    ``L·(hidden·head_dim·(2·n_q + 2·n_kv) + 3·hidden·intermediate + 2·hidden) + hidden + vocab·hidden·(1 or 2)``.
    Checked against SmolLM2-135M's loaded parameter count (134,515,008) in tests/test_cost.py."""
    attention = hidden_size * head_dim * (2 * num_heads + 2 * num_kv_heads)
    layer = attention + 3 * hidden_size * intermediate_size + 2 * hidden_size
    embeddings = vocab_size * hidden_size * (1 if tied_embeddings else 2)
    return num_layers * layer + hidden_size + embeddings


def _smollm2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> ModelSizes:
    params = llama_parameters(hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, num_heads=heads,
                              num_kv_heads=kv_heads, head_dim=64, vocab_size=49152, tied_embeddings=True)
    return ModelSizes(params, layers, heads, kv_heads, 64)


MODEL_FAMILIES: dict[str, dict[str, ModelSizes]] = {
    # HuggingFaceTB/SmolLM2-{135M,360M,1.7B} config.json: hidden, intermediate, layers, heads, kv heads (head_dim 64,
    # vocab 49152, tied embeddings); parameters counted by llama_parameters (135M: 134,515,008 as loaded).
    "smollm2": {"135m": _smollm2(576, 1536, 30, 9, 3), "360m": _smollm2(960, 2560, 32, 15, 5),
                "1.7b": _smollm2(2048, 8192, 24, 32, 32)},
    # Qwen/Qwen3-* config.json (layers, heads, kv heads, head_dim 128), as Kinetics reads them through AutoConfig in
    # cost_model/long_CoT/cost_model_genlen.py; parameters are that script's ``model_sizes`` (billions, with
    # embeddings): 0.752, 2.03, 4.02, 8.19, 14.77, 32.76.
    "qwen3": {"0.6b": ModelSizes(752_000_000, 28, 16, 8, 128), "1.7b": ModelSizes(2_030_000_000, 28, 16, 8, 128),
              "4b": ModelSizes(4_020_000_000, 36, 32, 8, 128), "8b": ModelSizes(8_190_000_000, 36, 32, 8, 128),
              "14b": ModelSizes(14_770_000_000, 40, 40, 8, 128), "32b": ModelSizes(32_760_000_000, 64, 64, 8, 128)},
}
"""Sizes of two public model families, typed from their configs (source in the comments): the cost model over
model size (docs/findings.md, "Kinetics: where decoding time goes"). Weights are not shipped: costs only."""


def family_sizes(name: str) -> ModelSizes:
    """The :data:`MODEL_FAMILIES` entry named ``"FAMILY-SIZE"`` (``"qwen3-8b"``, ``"smollm2-360m"``; any case).

    Raises ConfigError for a name that is not one of them (the error lists them)."""
    family, _, size = str(name).lower().partition("-")
    if size not in MODEL_FAMILIES.get(family, {}):
        raise ConfigError(f"expected a model family among {', '.join(family_names())}, got {name!r}")
    return MODEL_FAMILIES[family][size]


def family_names() -> list[str]:
    """``"FAMILY-SIZE"`` for every :data:`MODEL_FAMILIES` entry, for :func:`family_sizes`."""
    return [f"{family}-{size}" for family, sizes in MODEL_FAMILIES.items() for size in sizes]


def sizes_of(model: Any, num_parameters: int | None = None) -> ModelSizes:
    """:class:`ModelSizes` of a model.

    ``model`` is a :class:`attnlab.capture.loading.LoadedModel` (what :func:`attnlab.load_model` returns), a
    transformers model (a weightless one from :func:`model_from_config` too), or a
    :class:`attnlab.facts.ModelFacts`. The parameter count is ``sum(p.numel() for p in model.parameters())`` (tied
    weights once) unless ``num_parameters`` is given; a ModelFacts does not know it, so it needs ``num_parameters``.

    Raises ConfigError for another kind of object, or a ModelFacts without ``num_parameters``.
    """
    facts, module = model, None
    if hasattr(model, "facts") and hasattr(model, "model"):  # a LoadedModel
        facts, module = model.facts, model.model
    elif hasattr(model, "parameters") and hasattr(model, "config"):  # a transformers model
        from attnlab.capture.architectures import model_facts

        facts, module = model_facts(model), model
    fields = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
    if not all(hasattr(facts, field) for field in fields):
        raise ConfigError(f"expected a LoadedModel, a transformers model or a ModelFacts, got {type(model).__name__}")
    if num_parameters is None:
        if module is None:
            raise ConfigError("sizes_of(facts) needs num_parameters: a ModelFacts does not count parameters (pass the "
                              "LoadedModel or the model instead)")
        num_parameters = sum(p.numel() for p in module.parameters())
    return ModelSizes(_positive("num_parameters", num_parameters), *(int(getattr(facts, field)) for field in fields))


def model_from_config(config: Any) -> Any:
    """A transformers model built from ``config`` on torch's meta device: its sizes and parameter count without
    reading, downloading or allocating any weight (for :func:`sizes_of`; ``attnlab cost --model``).

    ``config`` is a ``transformers.PretrainedConfig``, a ``config.json`` path (any file name), or a folder holding
    ``config.json`` (tokenizer and weights not needed). attnlab's TinyLM configs work; remote code is never run.
    Causal LMs (:func:`attnlab.capture.architectures.is_causal_lm`) are built with AutoModelForCausalLM (so an
    untied LM head counts), others with AutoModel.

    Raises UsageError (one line) for a missing file, a folder without config.json (naming ``checkpoint/`` when the
    folder is a ``attnlab train --out`` folder), a file that is not a JSON object with a ``model_type`` transformers
    knows, or a config transformers cannot build a model from.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from attnlab.capture.architectures import is_causal_lm
    from attnlab.lab.modeling import register_auto

    register_auto()  # TinyLM's model_type
    if not isinstance(config, PretrainedConfig):
        path = Path(os.fspath(config)).expanduser()
        file = path / "config.json" if path.is_dir() else path
        if path.is_dir() and not file.is_file():
            hint = (f"; did you mean {path / 'checkpoint'}?" if (path / "checkpoint" / "config.json").is_file()
                    else "; expected a model folder or a config.json file")
            raise UsageError(f"{path} has no config.json{hint}")
        if not file.is_file():
            raise UsageError(f"{path} does not exist; expected a config.json file or a folder holding one")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise UsageError(f"cannot read {file} as a JSON config: {' '.join(str(error).split())}") from None
        model_type = data.get("model_type") if isinstance(data, dict) else None
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
            raise UsageError(f"{file} is not a transformers config: expected a JSON object with a known model_type "
                             f"such as \"llama\", got model_type {model_type!r}")
        try:
            config = AutoConfig.from_pretrained(str(file), trust_remote_code=False)
        except Exception as error:  # noqa: BLE001 - transformers' config validation raises many kinds
            raise UsageError(f"cannot read the config {file}: {' '.join(str(error).split())[:300]}") from None
    cls = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    try:
        # torch's meta device allocates nothing; accelerate's init_empty_weights also moves parameters made by
        # constructors the device context misses (e.g. a wrapped torch.empty)
        with torch.device("meta"), init_empty_weights():
            model = cls.from_config(config, trust_remote_code=False)
        model.tie_weights()  # init_empty_weights replaces parameters, which unties a tied LM head
        return model
    except Exception as error:  # noqa: BLE001 - any architecture's constructor: say which config, on one line
        raise UsageError(f"cannot build a {getattr(config, 'model_type', '?')} model from its config: "
                         f"{' '.join(str(error).split())[:300]}") from None


@dataclass(frozen=True)
class Cost:
    """Compute (FLOPs) and memory traffic (bytes) of one generation setting; ``efflops`` and ``seconds`` for an
    accelerator."""

    flops: float
    bytes: float

    def efflops(self, accelerator: Accelerator) -> float:
        """FLOPs + I·bytes."""
        return self.flops + accelerator.intensity * self.bytes

    def seconds(self, accelerator: Accelerator) -> float:
        """The predicted time: eFLOPs / peak = FLOPs/peak + bytes/bandwidth."""
        return self.efflops(accelerator) / accelerator.peak_flops


Attention = Literal["dense", "topk", "sliding_window", "linear"]


def _positive(name: str, value: int, minimum: int = 1) -> int:
    """``value`` as an int (any integral type: numpy and pandas integers too) >= ``minimum``; ConfigError if not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"expected {name} as an int >= {minimum}, got {value!r}")
    return int(value)


def _width(name: str, value: float, *, zero: bool) -> float:
    """``value`` as a finite float > 0 (>= 0 with ``zero``); ConfigError (naming ``name`` alone) if not."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value >= 0 if zero else value > 0))
    if not ok:
        raise ConfigError(f"expected {name} as a finite number {'>=' if zero else '>'} 0, got {value!r}")
    return float(value)


def attention_cost(sizes: ModelSizes, *, prompt_len: int, gen_len: int, samples: int = 1,
                   attention: Attention = "dense", window: int = 4096, block_size: int = 16, top_k: int = 256,
                   local: int = 128, kv_bytes: float = 2.0, weight_bytes: float = 0.0, batched: bool = False) -> Cost:
    """FLOPs and bytes of generating ``gen_len`` tokens for each of ``samples`` samples after a ``prompt_len`` prompt.

    Args:
        sizes: the model's :class:`ModelSizes`.
        prompt_len, gen_len, samples: L_in (>= 0), L_out (>= 1), N (>= 1).
        attention: "dense", "topk" (block top-k: ``block_size``, ``top_k``, ``local``), "sliding_window"
            (``window``) or "linear" (see the module docstring for each formula).
        kv_bytes: bytes per stored K or V element (2 = bf16); the linear state uses the same width.
        weight_bytes: bytes per parameter read at every decode step of every sample (0 = Kinetics' default,
            weights amortised; 4 = float32 batch-1 decoding).
        batched: the samples decode together as one batch, so each weight is read once per decode step for all of
            them (``weight_bytes·P·L_out``); False (default): once per sample (``weight_bytes·P·L_out·N``).

    Returns: a :class:`Cost`. Raises ConfigError for a size or length out of range or an unknown attention.
    """
    L_in, L_out, N = _positive("prompt_len", prompt_len, 0), _positive("gen_len", gen_len), _positive("samples", samples)
    kv_bytes, weight_bytes = _width("kv_bytes", kv_bytes, zero=False), _width("weight_bytes", weight_bytes, zero=True)
    P, n_q, n_kv, d = sizes.num_parameters, sizes.num_heads, sizes.num_kv_heads, sizes.folded_dim
    weights = 2.0 * P * L_out
    extra_bytes = weight_bytes * P * L_out * (1 if batched else N)
    if attention == "dense":
        flops = N * (weights + 2.0 * (2 * L_in + L_out) * L_out * n_q * d)
        return Cost(flops, kv_bytes * (2 * L_in + N * L_out) * L_out * n_kv * d + extra_bytes)
    if attention in ("topk", "sliding_window"):
        if attention == "topk":
            block_size = _positive("block_size", block_size)
            budget = _positive("local", local, 0) + block_size * _positive("top_k", top_k)
            blocks_seen = math.floor((2 * L_in + L_out) / block_size)
            search = blocks_seen * L_out * n_q * d
            representatives = kv_bytes / 2 * math.floor((2 * L_in + N * L_out) / block_size) * L_out * n_kv * d
        else:
            budget, search, representatives = _positive("window", window), 0.0, 0.0
        budget = min(budget, L_in + L_out)  # a budget past the whole context keeps every key: the dense count
        factor = budget * L_out - 0.5 * max(0, budget - L_in) ** 2
        flops = N * (weights + 4.0 * factor * n_q * d + search)
        return Cost(flops, kv_bytes * 2.0 * factor * n_kv * d * N + representatives + extra_bytes)
    if attention == "linear":
        state = n_q * sizes.head_dim * d  # per sample: heads × head_dim × head_dim × layers
        flops = N * (weights + 4.0 * L_out * state)
        return Cost(flops, kv_bytes * 2.0 * N * L_out * state + extra_bytes)
    raise ConfigError(f"expected attention among dense, topk, sliding_window, linear, got {attention!r}")


def prefill_cost(sizes: ModelSizes, *, prompt_len: int, samples: int = 1, kv_bytes: float = 2.0,
                 weight_bytes: float = 0.0, head_parameters: int = 0) -> Cost:
    """FLOPs and bytes of the prompt pass (attnlab's addition: Kinetics leaves prefill out).

    FLOPs ``N·[2·(P − H)·L_in + 2·H + 2·L_in²·n_q·d]``: every weight but the output head on every prompt token, the
    head (``head_parameters`` = H, e.g. vocab × hidden) on the last position only (transformers' generate passes
    ``logits_to_keep=1``), and QKᵀ plus AV over the causal triangle (L_in²/2 pairs, 4·head_dim FLOPs per pair and
    head, d = head_dim × layers). Bytes ``weight_bytes·P`` (every weight read once: a prompt pass is a matmul, not
    a matvec) ``+ kv_bytes·2·N·L_in·n_kv·d`` (the K and V written into the cache).

    Returns: a :class:`Cost`. Raises ConfigError for a size out of range (prompt_len >= 1 here).
    """
    L_in, N = _positive("prompt_len", prompt_len), _positive("samples", samples)
    head = _positive("head_parameters", head_parameters, 0)
    kv_bytes, weight_bytes = _width("kv_bytes", kv_bytes, zero=False), _width("weight_bytes", weight_bytes, zero=True)
    if head > sizes.num_parameters:
        raise ConfigError(f"expected head_parameters <= {sizes.num_parameters}, got {head_parameters!r}")
    n_q, n_kv, d = sizes.num_heads, sizes.num_kv_heads, sizes.folded_dim
    flops = N * (2.0 * (sizes.num_parameters - head) * L_in + 2.0 * head + 2.0 * L_in**2 * n_q * d)
    return Cost(flops, weight_bytes * sizes.num_parameters + kv_bytes * 2.0 * N * L_in * n_kv * d)


_OPTIONS = ("window", "block_size", "top_k", "local", "kv_bytes", "weight_bytes", "batched")


def _axis(name: str, values: Any, scalar: tuple[type, ...]) -> tuple:
    """A grid axis as a non-empty tuple: one value (an instance of ``scalar``) or an iterable of them."""
    if isinstance(values, scalar):
        return (values,)
    try:
        items = tuple(values)
    except TypeError:
        raise ConfigError(f"expected {name} as one value or a sequence of them, got {values!r}") from None
    if not items:
        raise ConfigError(f"expected at least one value in {name}, got {values!r}")
    return items


def _accelerator(value: Any) -> Accelerator:
    if isinstance(value, Accelerator):
        return value
    if isinstance(value, str) and value in ACCELERATORS:
        return ACCELERATORS[value]
    raise ConfigError(f"expected accelerators among {', '.join(ACCELERATORS)} (or Accelerator objects), got {value!r}")


def cost_table(sizes: ModelSizes, *, prompt_lens: Any, gen_lens: Any, samples: Any = (1,),
               attentions: Any = ("dense",), accelerators: Any = (ACCELERATORS["h100"],), **options: Any) -> list[dict]:
    """One row per (attention, prompt_len, gen_len, samples, accelerator): flops, bytes, efflops, seconds and
    ``memory_share`` (the part of eFLOPs that is memory traffic, I·bytes / eFLOPs). ``options`` go to
    :func:`attention_cost` (window, block_size, top_k, local, kv_bytes, weight_bytes, batched). Ready for
    ``pandas.DataFrame``.

    Each axis is one value or a sequence (``prompt_lens=1024`` or ``(1024, 8192)``; numpy integers work);
    ``accelerators`` holds :class:`Accelerator` objects or names of :data:`ACCELERATORS` (``"h100"``).
    Raises ConfigError for an empty axis, an unknown option or accelerator, or a value :func:`attention_cost`
    refuses.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"cost_table() got unknown option(s) {', '.join(unknown)}; expected among "
                          f"{', '.join(_OPTIONS)}")
    prompt_lens, gen_lens, samples = (_axis(name, values, (numbers.Integral, str)) for name, values in
                                      (("prompt_lens", prompt_lens), ("gen_lens", gen_lens), ("samples", samples)))
    attentions = _axis("attentions", attentions, (str,))
    devices = tuple(_accelerator(device) for device in _axis("accelerators", accelerators, (str, Accelerator)))
    rows = []
    for attention in attentions:
        for prompt_len in prompt_lens:
            for gen_len in gen_lens:
                for count in samples:
                    cost = attention_cost(sizes, prompt_len=prompt_len, gen_len=gen_len, samples=count,
                                          attention=attention, **options)
                    for device in devices:
                        efflops = cost.efflops(device)
                        rows.append({"attention": attention, "prompt_len": int(prompt_len), "gen_len": int(gen_len),
                                     "samples": int(count), "accelerator": device.name, "flops": cost.flops,
                                     "bytes": cost.bytes, "efflops": efflops, "seconds": cost.seconds(device),
                                     "memory_share": device.intensity * cost.bytes / efflops})
    return rows
