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
Every quantity here is a plain number (no torch, except :func:`measure_accelerator`, which times this machine);
:func:`sizes_of` reads the sizes from :class:`ModelFacts`; :data:`MODEL_FAMILIES` holds the sizes of two public model
families (SmolLM2, Qwen3) typed from their configs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from attnlab.errors import ConfigError

__all__ = ["ACCELERATORS", "MODEL_FAMILIES", "Accelerator", "Cost", "ModelSizes", "attention_cost", "cost_table",
           "llama_parameters", "measure_accelerator", "prefill_cost", "sizes_of"]


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
    note = (f"measured: float32 {size}² matmul {peak / 1e9:.1f} GFLOP/s; {mib} MiB matvec read {read / 1e9:.2f} GB/s "
            f"(sum {summed / 1e9:.2f}, copy {copy / 1e9:.2f} read + write); {torch.get_num_threads()} threads")
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


def sizes_of(facts: object, num_parameters: int) -> ModelSizes:
    """:class:`ModelSizes` from a :class:`attnlab.facts.ModelFacts` and the model's parameter count."""
    return ModelSizes(int(num_parameters), int(facts.num_layers), int(facts.num_heads),  # type: ignore[attr-defined]
                      int(facts.num_kv_heads), int(facts.head_dim))  # type: ignore[attr-defined]


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
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"expected {name} as an int >= {minimum}, got {value!r}")
    return value


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
    if not kv_bytes > 0 or not weight_bytes >= 0:
        raise ConfigError(f"expected kv_bytes > 0 and weight_bytes >= 0, got {kv_bytes!r} and {weight_bytes!r}")
    P, n_q, n_kv, d = sizes.num_parameters, sizes.num_heads, sizes.num_kv_heads, sizes.folded_dim
    weights = 2.0 * P * L_out
    extra_bytes = weight_bytes * P * L_out * (1 if batched else N)
    if attention == "dense":
        flops = N * (weights + 2.0 * (2 * L_in + L_out) * L_out * n_q * d)
        return Cost(flops, kv_bytes * (2 * L_in + N * L_out) * L_out * n_kv * d + extra_bytes)
    if attention in ("topk", "sliding_window"):
        if attention == "topk":
            budget = _positive("local", local, 0) + _positive("block_size", block_size) * _positive("top_k", top_k)
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
    if not kv_bytes > 0 or not weight_bytes >= 0 or head > sizes.num_parameters:
        raise ConfigError(f"expected kv_bytes > 0, weight_bytes >= 0 and head_parameters <= "
                          f"{sizes.num_parameters}, got {kv_bytes!r}, {weight_bytes!r} and {head_parameters!r}")
    n_q, n_kv, d = sizes.num_heads, sizes.num_kv_heads, sizes.folded_dim
    flops = N * (2.0 * (sizes.num_parameters - head) * L_in + 2.0 * head + 2.0 * L_in**2 * n_q * d)
    return Cost(flops, weight_bytes * sizes.num_parameters + kv_bytes * 2.0 * N * L_in * n_kv * d)


def cost_table(sizes: ModelSizes, *, prompt_lens: tuple[int, ...], gen_lens: tuple[int, ...],
               samples: tuple[int, ...] = (1,), attentions: tuple[str, ...] = ("dense",),
               accelerators: tuple[Accelerator, ...] = (ACCELERATORS["h100"],), **options: float | bool
               ) -> list[dict]:
    """One row per (attention, prompt_len, gen_len, samples, accelerator): flops, bytes, efflops, seconds and
    ``memory_share`` (the part of eFLOPs that is memory traffic, I·bytes / eFLOPs). ``options`` go to
    :func:`attention_cost` (window, block_size, top_k, local, kv_bytes, weight_bytes, batched). Ready for
    ``pandas.DataFrame``."""
    rows = []
    for attention in attentions:
        for prompt_len in prompt_lens:
            for gen_len in gen_lens:
                for count in samples:
                    cost = attention_cost(sizes, prompt_len=prompt_len, gen_len=gen_len, samples=count,
                                          attention=attention, **options)  # type: ignore[arg-type]
                    for device in accelerators:
                        efflops = cost.efflops(device)
                        rows.append({"attention": attention, "prompt_len": prompt_len, "gen_len": gen_len,
                                     "samples": count, "accelerator": device.name, "flops": cost.flops,
                                     "bytes": cost.bytes, "efflops": efflops, "seconds": cost.seconds(device),
                                     "memory_share": device.intensity * cost.bytes / efflops})
    return rows
