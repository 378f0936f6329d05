"""A synthetic ``results["patterns"]`` block (docs/results.md) with known weights, for the viewer tests."""

from __future__ import annotations

from typing import Any

import numpy as np

TOKENS = ["<|endoftext|>", "First", "</script><b>", " &amp;", "\n", " Citizen", ":", "\tBefore", " we", " proceed",
          " any", " further", ",", " hear", " me", " speak"]


def make_patterns(num_tokens: int = 12, heads: tuple[tuple[int, int], ...] = ((1, 2), (0, 3)), causal: bool = True,
                  seed: int = 0) -> dict[str, Any]:
    """Random softmax patterns, rows rounded to 4 d.p.: row i of a causal head has keys 0..i (sums ≈ 1)."""
    rng = np.random.default_rng(seed)
    tokens = [TOKENS[i % len(TOKENS)] for i in range(num_tokens)]
    out = []
    for layer, head in heads:
        probs = []
        for query in range(num_tokens):
            width = query + 1 if causal else num_tokens
            logits = rng.normal(0.0, 2.0, width)
            row = np.exp(logits - logits.max())
            probs.append([round(float(p), 4) for p in row / row.sum()])
        out.append({"layer": layer, "head": head, "label": f"sink α₀={probs[-1][0]:.2f}", "probs": probs})
    return {"window": 0, "tokens": tokens, "causal": causal, "selection": "auto", "heads": out}
