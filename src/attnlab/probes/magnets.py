"""Attention magnets: attention mass received by token classes, per (layer, head), and global sinks per layer.

After Kukleva et al. 2025 (RefAM, METHODS.md #16; low confidence, from the abstract): stop words and similar filler
tokens absorb surplus attention ("magnets"), and in deeper layers a few tokens receive high attention from all
queries ("global sinks"). RefAM studies text→image cross-attention; here the same questions are asked of text
self-attention.

Token classes (``CLASSES``, the ``position`` column of the class rows): 0 ``bos`` (the first real token when it is
the tokenizer's BOS/CLS id), 1 ``newline`` (the decoded token contains a line break), 2 ``punctuation`` (only
punctuation/symbol characters), 3 ``stop_word`` (a built-in English stop-word list, case-insensitive, spaces
stripped), 4 ``other``. Statistics per (layer, head, class), averaged over real query rows:
- ``class_mass``: Σ_k∈class A_qk, the attention a row pays to the class;
- ``class_share``: the fraction of the row's visible keys in the class (what uniform attention would pay);
- ``class_enrichment`` = class_mass / class_share (1 = no preference).
Global sinks: a non-initial key k whose score g_k = mean over heads and over the real queries that see k of A_qk
exceeds ``theta`` (default 0.1), among keys seen by ≥ ``min_queries`` queries (default 16).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.functional.attention import BlockView
from attnlab.params import Range, validated
from attnlab.probes import PROBES
from attnlab.probes.base import AttentionCall, ModelFacts, Probe, Row, RowWriter, safe_div
from attnlab.report.sections import Column, Heatmap, LayerCurve, Section, Series, Table, Text

CLASSES = ("bos", "newline", "punctuation", "stop_word", "other")
STOP_WORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through thou thee thy thine to too under until up upon very was we
were what when where which while who whom why will with would ye you your yours yourself yourselves shall hath doth
'tis o""".split())


def token_class(text: str) -> int:
    """Class index (1–4) of a decoded token string; ``bos`` (0) is decided by id and position, not by text."""
    if "\n" in text or "\r" in text:
        return 1
    stripped = text.strip()
    if stripped and all(unicodedata.category(c)[0] in "PS" for c in stripped):
        return 2
    if stripped.lower() in STOP_WORDS:
        return 3
    return 4


@PROBES.register("magnets")
class MagnetsProbe(Probe):
    """Attention mass on token classes (BOS, newline, punctuation, stop words, other) and global sinks per layer.

    Args:
        theta: global-sink threshold on the head-averaged column score (default 0.1).
        min_queries: keys seen by fewer real queries are not global-sink candidates (default 16).
        token_classes: optional {token_id: class index 1–4}; filled from the tokenizer by ``prepare``. A Session
            raises ConfigError when neither was given (every key would be "other").
    """

    shardable = True  # export_state/import_state carry the whole state
    hit_lists = ("hits",)

    needs = frozenset({"probs"})
    needs_runner = True  # prepare() classifies the tokenizer's vocabulary

    sections = (Section("probe-magnets", "Attention magnets", (
        Text(template="Attention mass each token class receives (mean over heads and query rows) and keys that draw "
                      "head-averaged attention > θ = {theta} from the queries that see them."),
        Heatmap((Series("class_mass", "attention mass by token class", "mass (0–1)", vmin=0.0, vmax=1.0),),
                columns="position", xlabel="token class: {classes}",
                alt="Heatmap of attention mass by token class per layer",
                caption="Rows: layers; columns: token classes in the order listed (see results.csv for per-head "
                        "values and the enrichment over uniform attention)."),
        LayerCurve((Series("global_sinks", "global sinks"),), title="global sinks per layer", ylabel="per window",
                   alt="Global sinks per layer", caption="Non-initial keys above θ, per window."),
        Table((Column("token", "token", "token"), Column("class", "class", "text"), Column("hits", "hits")),
              extras="global_sink_tokens", top=15, caption="Global-sink tokens (hits = (window, layer))."),
    )),)

    @validated
    def __init__(self, theta: Annotated[float, Range(gt=0.0, lt=1.0)] = 0.1, min_queries: Annotated[int, Range(ge=1)] = 16,
                 token_classes: dict[int, int] | None = None,
                 bos_token_id: Annotated[int, Range(ge=0)] | None = None) -> None:
        self.theta, self.min_queries = theta, min_queries
        self.token_classes = dict(token_classes or {})
        self.classified = token_classes is not None  # prepare() fills the classes from the tokenizer
        self.bos_token_id = bos_token_id
        self._table: Tensor | None = None

    def prepare(self, facts: Any, runner: Any) -> None:
        """Classify every vocabulary entry from its decoded string (``runner.vocab_strings()``)."""
        if not self.token_classes:
            self.token_classes = {i: token_class(s) for i, s in enumerate(runner.vocab_strings())}
        self.classified = True
        if self.bos_token_id is None:
            self.bos_token_id = runner.bos_token_id
        self._table = None

    def bind(self, facts: ModelFacts) -> None:
        if not self.classified:
            raise ConfigError("magnets needs token classes: pass token_classes, or call prepare(facts, runner) before "
                              "the Session (`attnlab report`/`attnlab probe` do); without them every key is 'other'")
        super().bind(facts)
        L, H, C = facts.num_layers, facts.num_heads, len(CLASSES)
        self.mass_sum = torch.zeros(L, H, C, dtype=torch.float64)
        self.share_sum = torch.zeros(L, H, C, dtype=torch.float64)
        self.rows_seen = torch.zeros(L, H, dtype=torch.float64)
        self.global_count = torch.zeros(L, dtype=torch.float64)
        self.sequences = torch.zeros(L, dtype=torch.float64)
        self.hits: list[tuple[int, int, int, int, float]] = []  # sequence, layer, position, token, score

    def _classes(self, call: AttentionCall) -> Tensor:
        """(B, Lk) class index of every key (``other`` where ids are unknown)."""
        ids = call.sequence.input_ids
        B, Lk = call.key_valid.shape
        if ids is None or ids.shape[1] < Lk:
            classes = torch.full((B, Lk), len(CLASSES) - 1, dtype=torch.long)
        else:
            ids = ids[:, -Lk:].cpu()
            if self._table is None or self._table.numel() <= int(ids.max()):
                size = max(max(self.token_classes, default=0), int(ids.max())) + 1
                self._table = torch.full((size,), len(CLASSES) - 1, dtype=torch.long)
                for token, cls in self.token_classes.items():
                    self._table[token] = cls
            classes = self._table[ids]
            if self.bos_token_id is not None:
                first = (call.key_positions.cpu() == 0) & (ids == self.bos_token_id)
                classes = torch.where(first, torch.zeros_like(classes), classes)
        return classes.to(call.key_valid.device)

    def begin_call(self, call: AttentionCall) -> None:
        B, Lk = call.key_valid.shape[0], call.kv_len
        classes = self._classes(call)
        self._onehot = torch.nn.functional.one_hot(classes, len(CLASSES)).float() * call.key_valid[..., None]
        self._col_sum = torch.zeros(B, Lk, device=call.value.device)
        self._col_count = torch.zeros(B, Lk, device=call.value.device)
        self._rows = 0

    def update(self, call: AttentionCall, block: BlockView) -> None:
        probs = block.probs  # (B, H, bq, width)
        B, H, bq, width = probs.shape
        onehot = self._onehot[:, None, :width]  # (B, 1, width, C)
        query_ok = call.query_valid[:, block.q_index].to(probs.dtype)  # (B, bq)
        keep = block.keep if block.keep is not None else torch.ones(1, 1, bq, width, dtype=torch.bool,
                                                                     device=probs.device)
        keep = keep & call.key_valid[:, None, None, :width]
        mass = probs.float() @ onehot  # (B, H, bq, C)
        visible = keep.float() @ onehot  # (B, 1|H, bq, C) keys per class
        share = visible / visible.sum(-1, keepdim=True).clamp_min(1)
        row_ok = (query_ok[:, None, :] * (keep.any(-1).float())).expand(B, H, bq)  # (B, H, bq)
        layer = call.layer_idx
        self.mass_sum[layer] += (mass * row_ok[..., None]).sum(dim=(0, 2)).double().cpu()
        self.share_sum[layer] += (share.expand(B, H, bq, -1) * row_ok[..., None]).sum(dim=(0, 2)).double().cpu()
        self.rows_seen[layer] += row_ok.sum(dim=(0, 2)).double().cpu()
        self._col_sum[:, :width] += (query_ok[:, None, :] @ probs.float().mean(dim=1)).squeeze(1)
        self._col_count[:, :width] += (keep.any(dim=1) & (query_ok[:, :, None] > 0)).sum(dim=1)
        self._rows += bq

    def end_call(self, call: AttentionCall) -> None:
        score = safe_div(self._col_sum.double(), self._col_count.double()).cpu()  # (B, Lk)
        need = max(1, round(self.min_queries * min(1.0, self._rows / max(call.q_len, 1))))
        candidate = ((call.key_positions >= 1) & call.key_valid).cpu() & (self._col_count.cpu() >= need)
        hit = (score > self.theta) & candidate
        self.global_count[call.layer_idx] += float(hit.sum())
        self.sequences[call.layer_idx] += score.shape[0]
        ids = call.sequence.input_ids
        for b, j in hit.nonzero().tolist():
            token = int(ids[b, ids.shape[1] - call.kv_len + j]) if ids is not None and ids.shape[1] >= call.kv_len \
                else -1
            self.hits.append((call.sequence.sequence_offset + b, call.layer_idx, int(call.key_positions[b, j]),
                              token, float(score[b, j])))
        del self._onehot, self._col_sum, self._col_count

    def state(self) -> dict[str, Tensor]:
        return {"mass_sum": self.mass_sum, "share_sum": self.share_sum, "rows_seen": self.rows_seen,
                "global_count": self.global_count, "sequences": self.sequences}

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        seen = self.rows_seen > 0
        mass = safe_div(self.mass_sum, self.rows_seen[..., None])
        share = safe_div(self.share_sum, self.rows_seen[..., None])
        enrichment = safe_div(mass, share)
        for c in range(len(CLASSES)):
            out.add_grid("class_mass", mass[..., c], position=c, valid=seen)
            out.add_grid("class_share", share[..., c], position=c, valid=seen)
            out.add_grid("class_enrichment", enrichment[..., c], position=c, valid=seen & (share[..., c] > 0))
        layer_seen = self.sequences > 0
        out.add_indexed("global_sinks", safe_div(self.global_count, self.sequences), layer_seen, ("layer",))
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        label = (lambda t: decode(t) if t >= 0 else "?") if decode is not None else str
        counts: Counter[int] = Counter(t for _, _, _, t, _ in self.hits)
        tokens = [{"token_id": t, "token": label(t), "class": CLASSES[self.token_classes.get(t, 4)]
                   if t != self.bos_token_id else "bos", "hits": n} for t, n in counts.most_common(30)]
        return {"classes": list(CLASSES), "theta": self.theta, "min_queries": self.min_queries,
                "global_sink_tokens": tokens, "num_global_sinks": len(self.hits)}
