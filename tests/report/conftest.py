"""Fixtures for the report tests: a realistic synthetic results dict (current schema, docs/results.md)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from attnlab.columns import SCHEMA_VERSION
from attnlab.report.upgrade import declared_sections

MALICIOUS = "<script>alert(1)</script>"
AWKWARD_TOKENS = [MALICIOUS, "&amp;", '"', "\n", "\t", " world", "\x07", "it's", "", "\u202e", "<img src=x>"]


def make_results(
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seq_len: int = 16,
    num_windows: int = 2,
    seed: int = 0,
    version: int = SCHEMA_VERSION,
) -> dict[str, Any]:
    """A results dict with every statistic of docs/results.md, plausible values, awkward tokens and one NaN.

    ``version=1`` gives the layout of schema version 1: no ``variant`` column, no ``sections``.
    """
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []

    def add(probe: str, stat: str, layer: Any, head: Any, position: Any, value: float) -> None:
        variant = {"variant": None} if version >= 2 else {}
        rows.append({"probe": probe, **variant, "statistic": stat, "layer": layer, "head": head,
                     "position": position, "value": float(value)})

    hist_edges = [round(i / 20, 2) for i in range(21)]
    bin_starts = [0] + [2**i for i in range(int(math.log2(seq_len)))]
    num_keys = 4
    hidden_sinks, extreme = [], {}
    for layer in range(num_layers):
        sinky = layer > 0
        for head in range(num_heads):
            add("entropy", "entropy", layer, head, None, rng.uniform(0.3, 2.5))
            add("entropy", "normalised_entropy", layer, head, None, rng.uniform(0.05, 0.9))
            for b, fraction in enumerate(rng.dirichlet(np.ones(20))):
                add("entropy", "normalised_entropy_hist", layer, head, b, fraction)
            alpha0 = rng.uniform(0.5, 0.95) if sinky and head % 3 != 2 else rng.uniform(0.02, 0.25)
            for k in range(num_keys):
                add("sink", "alpha", layer, head, k, alpha0 if k == 0 else rng.uniform(0.0, 0.1))
            add("sink", "sink_indicator", layer, head, 0, float(alpha0 > 0.3))
            add("sink", "hidden_sinks", layer, head, None, rng.poisson(1.5))
            exponent = rng.uniform(0.4, 1.6)
            for d0 in bin_starts:
                mean = 0.5 if d0 == 0 else 0.3 * d0 ** (-exponent)
                add("distance", "mass", layer, head, d0, mean * max(d0, 1))
                add("distance", "mean_attention", layer, head, d0, mean)
                add("distance", "mean_attention_no_sink", layer, head, d0, mean * 0.8)
            for suffix in ("", "_no_sink"):
                add("distance", f"power_law_exponent{suffix}", layer, head, None, -exponent)
                r2 = math.nan if (layer, head, suffix) == (0, 0, "") else rng.uniform(0.7, 0.99)
                add("distance", f"power_law_r2{suffix}", layer, head, None, r2)
                add("distance", f"exp_decay_rate{suffix}", layer, head, None, rng.uniform(0.05, 0.4))
                add("distance", f"exp_decay_r2{suffix}", layer, head, None, rng.uniform(0.3, 0.9))
            if head == 1:
                token = AWKWARD_TOKENS[layer % len(AWKWARD_TOKENS)]
                hidden_sinks.append({"window": 0, "layer": layer, "head": head, "position": 3 + layer,
                                     "token": token, "score": float(rng.uniform(0.1, 0.5))})
                entry = extreme.setdefault(token, {"token": token, "hits": 0, "max_score": 0.0, "mean_score": 0.0})
                entry["hits"] += 1
                entry["max_score"] = max(entry["max_score"], hidden_sinks[-1]["score"])
                entry["mean_score"] = hidden_sinks[-1]["score"]
        add("sink", "sink_rate", layer, None, 0,
            np.mean([r["value"] for r in rows if r["statistic"] == "sink_indicator" and r["layer"] == layer]))
        norms = rng.uniform(5, 10, seq_len) * (1 + layer)
        norms[0] *= 40 if sinky else 1.2
        for p in range(seq_len):
            add("norms", "residual_norm", layer, None, p, norms[p])
        add("norms", "residual_peak_ratio", layer, None, None, norms[0] / np.median(norms[1:]))
        for g in range(num_kv_heads):
            values = rng.uniform(1, 3, seq_len)
            values[0] *= 0.05 if sinky else 0.9
            for p in range(seq_len):
                add("norms", "value_norm_kv", layer, g, p, values[p])
            add("norms", "value_drain_ratio_kv", layer, g, None, values[0] / np.median(values[1:]))

    windows = []
    for w in range(num_windows):
        tokens = ["<|im_start|>"] + [f" word{i}" for i in range(1, seq_len)]
        for j, token in enumerate(AWKWARD_TOKENS[: seq_len - 1]):  # every awkward token in every window
            tokens[1 + (j + w) % min(len(AWKWARD_TOKENS), seq_len - 1)] = token
        windows.append({"index": w, "source": "hamlet_gut.txt", "start_token": w * seq_len,
                        "ids": [int(x) for x in rng.integers(0, 49152, seq_len)], "tokens": tokens})

    sections = {"sections": declared_sections(["entropy", "sink", "distance", "norms"])} if version >= 2 else {}
    return {
        "schema_version": version,
        "attnlab_version": "0.1.0",
        "created": "2026-11-29T21:00:00+00:00",
        "command": "report",
        "config": {"model": "smollm2-135m", "text": "shakespeare", "seq_len": seq_len, "max_windows": num_windows,
                   "probes": ["entropy", "sink", "distance", "norms"], "block_size": 128, "query_fraction": 1.0,
                   "bos": "auto", "dtype": "float32", "device": "cpu", "seed": seed},
        "model": {"name": "smollm2-135m", "source": "HuggingFaceTB/SmolLM2-135M", "class": "LlamaForCausalLM",
                  "file_sha256": "9f" * 32, "num_layers": num_layers, "num_heads": num_heads,
                  "num_kv_heads": num_kv_heads, "dtype": "float32"},
        "tokenizer": {"class": "GPT2TokenizerFast", "bos_policy": "auto", "bos_token": "<|im_start|>",
                      "bos_added": False},
        "seed": seed,
        "versions": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.24.0", "attnlab": "0.1.0"},
        "attention_paths": {str(layer): "blocked_eager" for layer in range(num_layers)},
        "windows": windows,
        "rows": rows,
        "extras": {
            "entropy": {"hist_edges": hist_edges},
            "sink": {"epsilon": 0.3, "theta": 0.1, "num_keys": num_keys, "hidden_sinks": hidden_sinks,
                     "extreme_tokens": list(extreme.values())},
            "distance": {"bin_starts": bin_starts},
            "norms": {},
        },
        "timing": {"seconds": 12.3},
        **sections,
    }


@pytest.fixture
def fake_results() -> dict[str, Any]:
    """A fresh synthetic results dict: 3 layers × 4 heads, 2 kv heads, 2 windows of 16 awkward tokens."""
    return make_results()


@pytest.fixture(scope="session")
def results_factory():
    """``make_results`` itself, for tests that need other sizes."""
    return make_results
