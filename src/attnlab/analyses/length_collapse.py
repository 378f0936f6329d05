"""Length-induced embedding collapse of an encoder (Zhou et al. 2025, TempScale, METHODS.md #6).

Texts of several token lengths are cut from the run's text: ``count`` passages start at evenly spaced offsets, and
bucket n holds the first n text tokens of each (so buckets differ only in length). Each text is encoded with the
tokenizer's special tokens ([CLS] … [SEP] for BERT) in one right-padded batch and mean-pooled over its real tokens,
as sentence-transformers does for MiniLM. Per bucket (``position`` = text length in tokens):
- ``mean_cosine``: mean pairwise cosine similarity of the embeddings (off-diagonal pairs); collapse = it rises
  with length;
- ``norm_ratio``: ‖mean embedding‖ / mean ‖embedding‖ (1 = all embeddings point the same way);
- ``highpass_gain`` (per layer): σ_max(P A P) with P = I - 11ᵀ/n over the n real tokens, the largest gain of the
  attention matrix A on zero-mean (high-frequency) signals, averaged over heads and texts. Attention is a low-pass
  filter (A1 = 1); TempScale's argument is that this gain shrinks as n grows, so long texts keep mostly their mean;
- ``highpass_ratio`` (per layer): ‖P A V‖_F / ‖P V‖_F on the layer's actual value states V (n × head_dim, per
  head), the share of the values' high-frequency energy that passes the attention, averaged over heads and texts
  (σ_max is a worst case over all signals; this is the gain on the signal the model feeds it).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.analyses import ANALYSES
from attnlab.analyses.base import Analysis, Runner
from attnlab.errors import ConfigError
from attnlab.facts import ModelFacts
from attnlab.params import Range, validated
from attnlab.probes.base import Row, RowWriter
from attnlab.report.sections import Column, PositionCurve, Section, Series, Table, Text


def mean_pool(hidden: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``hidden`` (batch, seq_len, hidden_size) over the real tokens (``valid`` (batch, seq_len), True =
    real; special tokens count), as sentence-transformers pools MiniLM; returns (batch, hidden_size) float64."""
    mask = valid[..., None].double()
    return (hidden.double() * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def highpass_gain(probs: Tensor) -> Tensor:
    """σ_max(P A P) per (..., n, n) attention matrix, P = I - 11ᵀ/n; returns (...,) float64."""
    n = probs.shape[-1]
    P = torch.eye(n, dtype=torch.float64) - 1.0 / n
    return torch.linalg.matrix_norm(P @ probs.double() @ P, ord=2)


def highpass_ratio(probs: Tensor, value: Tensor) -> Tensor:
    """‖P A V‖_F / ‖P V‖_F per head: probs (H, n, n), value (H, n, d); returns (H,) float64 (NaN if P V = 0)."""
    v = value.double()
    centred = v - v.mean(-2, keepdim=True)
    out = probs.double() @ v
    out = out - out.mean(-2, keepdim=True)
    denominator = centred.flatten(-2).norm(dim=-1)
    return torch.where(denominator > 0, out.flatten(-2).norm(dim=-1) / denominator.clamp_min(1e-300),
                       torch.full_like(denominator, float("nan")))


@ANALYSES.register("length_collapse")
class LengthCollapseAnalysis(Analysis):
    """Embedding similarity and norm ratio per text-length bucket, and attention's high-pass gain per layer.

    Args:
        lengths: text lengths in tokens (default [8, 16, 32, 64, 128, 256]; longer ones than the text allows
            are dropped). count: texts per bucket (default 16).
    """

    shardable = True  # observe only collects token ids; finish runs once on all of them

    sections = (Section("probe-length-collapse", "Length collapse", (
        Text(template="{count} texts per length, mean-pooled embeddings."),
        PositionCurve((Series("mean_cosine", "mean pairwise cosine", layers="none"),
                       Series("norm_ratio", "norm ratio", layers="none")),
                      title="embedding collapse vs length", xlabel="text length (tokens)", ylabel="0–1", logx=True,
                      alt="Embedding similarity against text length",
                      caption="Mean pairwise cosine similarity and ‖mean‖/mean‖e‖ of the embeddings per length "
                              "bucket (collapse = rising)."),
        PositionCurve((Series("highpass_gain", "σmax, layer {layer}", layers="picked"),
                       Series("highpass_ratio", "on V, layer {layer}", layers="picked", dashed=True)),
                      title="attention high-pass gain", xlabel="text length (tokens)",
                      ylabel="σmax(PAP); ‖PAV‖/‖PV‖ dashed", logx=True,
                      alt="Attention high-pass gain against text length",
                      caption="σmax of attention on zero-mean signals (solid) and the share of the value states' "
                              "zero-mean energy that passes (dashed)."),
        Table((Column("mean_cosine", "mean cosine"), Column("norm_ratio", "norm ratio")), index_header="length",
              caption="Per length bucket."),
    )),)

    @validated
    def __init__(self, lengths: tuple[Annotated[int, Range(ge=2)], ...] = (8, 16, 32, 64, 128, 256),
                 count: Annotated[int, Range(ge=2)] = 16) -> None:
        lengths = sorted(set(lengths))
        if not lengths:
            raise ConfigError(f"lengths must list integers >= 2, got {lengths}")
        self.lengths, self.count = lengths, count
        self.ids: list[int] = []
        self.results: dict[int, dict[str, Any]] = {}

    def prepare(self, facts: ModelFacts, runner: Runner) -> None:
        super().prepare(facts, runner)
        self.ids, self.results = [], {}

    def observe(self, runner: Runner, batch: dict[str, Tensor]) -> None:
        specials = set(getattr(runner.tokenizer, "all_special_ids", []) or [])
        valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        for row, ok in zip(batch["input_ids"].tolist(), valid.tolist()):
            self.ids.extend(t for t, real in zip(row, ok) if real and t not in specials)

    def merge(self, other: Analysis) -> None:
        """Append the other analysis's token ids (later windows)."""
        self.ids.extend(other.ids)  # type: ignore[attr-defined]

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensor ``ids`` (the collected text token ids, int64); nothing else is known before ``finish``."""
        return {"ids": torch.tensor(self.ids, dtype=torch.long)}, {}

    def import_state(self, tensors: dict[str, Tensor], side: dict[str, Any]) -> None:
        self.ids = tensors["ids"].tolist()

    def planned_steps(self, batches: int, windows: int) -> tuple[int, int]:
        """Each batch is one step (its tokens are only collected); ``finish`` has one step per length."""
        return 1, len(self.lengths)

    def finish(self, runner: Runner) -> None:
        limit = self.facts.max_positions or 10**9
        spacing = len(self.ids) // self.count
        for number, n in enumerate(self.lengths):
            self.report_progress(number, len(self.lengths), "length")
            if n > spacing or n + 2 > limit:
                continue
            texts = [self.ids[i * spacing : i * spacing + n] for i in range(self.count)]
            batch = runner.encode(texts)
            valid = batch["attention_mask"].bool()
            with torch.no_grad():
                record = runner.forward(batch)
                probs, values = runner.attention_probs(batch, with_values=True)
            embeddings = mean_pool(record.last_hidden, valid)  # (count, D)
            unit = embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cosine = unit @ unit.T
            off = ~torch.eye(self.count, dtype=torch.bool)
            gains, ratios = [], []
            real = valid.cpu()
            for layer_probs, layer_values in zip(probs, values):  # (count, H, L, L), (count, Hkv, L, D)
                groups = layer_probs.shape[1] // layer_values.shape[1]
                per_text = [highpass_gain(layer_probs[i][:, real[i]][:, :, real[i]]).mean()
                            for i in range(self.count)]
                gains.append(float(torch.stack(per_text).mean()))
                per_text = [highpass_ratio(layer_probs[i][:, real[i]][:, :, real[i]],
                                           layer_values[i].repeat_interleave(groups, dim=0)[:, real[i]]).nanmean()
                            for i in range(self.count)]
                ratios.append(float(torch.stack(per_text).nanmean()))
            self.results[n] = {
                "mean_cosine": float(cosine[off].mean()),
                "norm_ratio": float(embeddings.mean(0).norm() / embeddings.norm(dim=-1).mean()),
                "highpass_gain": gains,
                "highpass_ratio": ratios,
            }

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        for n, result in sorted(self.results.items()):
            out.add("mean_cosine", result["mean_cosine"], position=n)
            out.add("norm_ratio", result["norm_ratio"], position=n)
            out.add("num_texts", self.count, position=n)
            for layer, gain in enumerate(result["highpass_gain"]):
                out.add("highpass_gain", gain, layer, position=n)
            for layer, ratio in enumerate(result["highpass_ratio"]):
                if ratio == ratio:
                    out.add("highpass_ratio", ratio, layer, position=n)
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        return {"lengths": sorted(self.results), "requested_lengths": self.lengths, "count": self.count,
                "pooling": "mean over real tokens (special tokens included), as sentence-transformers",
                "text_tokens": len(self.ids)}
