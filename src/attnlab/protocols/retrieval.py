"""TempScale on retrieval: top-1 accuracy and MRR by document length, with and without logits / τ (METHODS.md #6).

Zhou et al. 2025 ("Length-Induced Embedding Collapse", TempScale, §4; METHODS.md #6) argue that the embeddings of
long texts collapse into a narrow cone and that dividing every attention logit by τ < 1 counters it, with gains on
retrieval benchmarks (MTEB, LongEmbed). This protocol measures that claim on a retrieval task built from local
text, where the only thing that changes across conditions is the document length.

The task (:func:`build_task`), in token space (every line tokenized on its own, without special tokens):

- **queries**: ``num_queries`` lines of the text, drawn with ``random.Random(seed)`` among the lines that have
  ``min_query_tokens``–``max_query_tokens`` tokens, contain a lower-case letter (no speaker names or headings) and
  occur once in the text (compared lower-cased, whitespace collapsed);
- **filler passages**: runs of consecutive whole lines starting at random lines, ``num_queries + num_distractors``
  of them, non-overlapping, each long enough for the longest document and containing no query's tokens;
- **documents** of every length ``L`` in ``lengths`` (``L`` counts the tokens the encoder sees, the tokenizer's
  special tokens such as [CLS] … [SEP] included, so ``L = 512`` is MiniLM's limit): document ``i < num_queries``
  is the first ``L - specials - len(query i)`` tokens of filler ``i`` with query ``i`` inserted at a line
  boundary, the one nearest to ``depth_i`` × the filler's length (``depth_i`` uniform in [0, 1], one per query, the
  same at every length); document ``num_queries + j`` (a distractor) is the first ``L - specials`` tokens of filler
  ``num_queries + j``. Documents of one length differ from those of another only in how many tokens of the same
  passage they hold (the buckets of :mod:`attnlab.analyses.length_collapse`).

Scoring (:func:`positive_ranks`): queries and documents are encoded with the tokenizer's special tokens and
mean-pooled over their real tokens (:func:`attnlab.analyses.length_collapse.mean_pool`, as sentence-transformers
pools MiniLM); each query ranks all ``num_queries + num_distractors`` documents of a length by cosine similarity
(its own document is the one positive; the others are distractors). ``rank = 1 + #(other documents with a cosine
>= the positive's)`` (ties count against the query). Per (variant, length): top-1 accuracy with a Wilson 95 %
interval (scipy), MRR (mean 1/rank) with its standard error, the mean cosine of the positive pairs and of the
query–distractor pairs, the mean pairwise cosine of the documents (length collapse's ``mean_cosine``), and, against
the baseline, the queries each variant gains and loses at top-1 with McNemar's exact two-sided p (a binomial test
of gains among the discordant queries, scipy).

Every variant (the baseline first, then each ``--edit`` list, e.g. ``temperature:tau=0.8``) embeds the same
queries and documents inside its own ``Session``; the edit report and attention paths are stored per variant.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnlab.config import (INT_LIMIT, SEED_LIMIT, ComposedConfig, ModelSpec, TextSpec, check_names, check_range,
                            check_types)
from attnlab.errors import ConfigError
from attnlab.evaluation.config import number_list_parser
from attnlab.progress import Progress, ProgressArg, progress_to
from attnlab.stats.intervals import paired_binary, wilson_interval
from attnlab.text import special_tokens

__all__ = ["RetrievalConfig", "RetrievalSpec", "RetrievalTask", "build_task", "embed", "paired_top1",
           "positive_ranks", "rank_summary", "run_retrieval", "special_tokens"]

PROBE = "retrieval"
DEFINITIONS = {
    "top1": "fraction of queries whose own document has the highest cosine among all documents of that length "
            "(ties count against); top1_low/top1_high: Wilson 95 % interval",
    "mrr": "mean over queries of 1 / rank of the query's own document; mrr_se: its standard error",
    "positive_cosine": "mean cosine of (query, its document)",
    "distractor_cosine": "mean cosine of (query, every other document of that length)",
    "doc_mean_cosine": "mean pairwise cosine of the documents of that length (length collapse: rises with length)",
    "gained/lost": "queries right at top-1 under the variant and wrong under the baseline / the reverse",
    "mcnemar_p": "McNemar's exact two-sided p of gained vs lost (binomial test, p = 0.5, on gained + lost)",
}


_parse_lengths = number_list_parser(int, "--lengths")


@dataclass(frozen=True)
class RetrievalSpec:
    """What a retrieval run builds and compares (the protocol part of :class:`RetrievalConfig`).

    Attributes:
        text: UTF-8 text file of the queries and passages; None = the bundled corpus (modern-spelling plays).
        lengths: document lengths in tokens as the encoder sees them (special tokens included), each >= 2.
        queries: number of queries (and of positive documents) per length, >= 2.
        distractors: documents per length that hold no query, >= 0.
        min_query_tokens, max_query_tokens: token range of a query line (no special tokens).
        batch_size: sequences per forward pass.
        variants: edit specs, one string per variant (CLI ``--edit``; the baseline always runs first).
        seed: ``random.Random(seed)`` draws queries, passages and depths; torch is seeded too.
    """

    text: str | None = None
    lengths: tuple[int, ...] = field(default=(32, 64, 128, 256, 512), metadata={"parse": _parse_lengths})
    queries: int = 32
    distractors: int = 32
    min_query_tokens: int = 8
    max_query_tokens: int = 20
    batch_size: int = 16
    variants: tuple[str, ...] = field(default=(), metadata={"option": "edit"})
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, {"queries": int, "distractors": int, "min_query_tokens": int, "max_query_tokens": int,
                           "batch_size": int, "seed": int})
        if self.text is not None and not isinstance(self.text, str):
            raise ConfigError(f"text must be a path string, got {self.text!r}")
        check_names("variants (--edit)", self.variants)
        check_range(self, {"queries": (2, INT_LIMIT), "distractors": (0, INT_LIMIT),
                           "min_query_tokens": (1, INT_LIMIT), "max_query_tokens": (1, INT_LIMIT),
                           "batch_size": (1, INT_LIMIT), "seed": (0, SEED_LIMIT)})
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= INT_LIMIT
                                   for n in self.lengths):
            raise ConfigError(f"--lengths must be integers >= 2, got {list(self.lengths)}")
        if len(set(self.lengths)) != len(self.lengths):
            raise ConfigError(f"each length may be given once, got {list(self.lengths)}")
        if self.min_query_tokens > self.max_query_tokens:
            raise ConfigError(f"min_query_tokens must be <= max_query_tokens, got {self.min_query_tokens} > "
                              f"{self.max_query_tokens}")
        if min(self.lengths) < self.max_query_tokens + 1:  # before any model loads; build_task counts specials
            raise ConfigError(f"--lengths {min(self.lengths)} is too short: each length needs >= max_query_tokens + 1 "
                              f"= {self.max_query_tokens + 1} tokens (plus the encoder's special tokens); use longer "
                              "lengths or a smaller --max-query-tokens")
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"each --edit variant may be given once, got {list(self.variants)}")


@dataclass(frozen=True, init=False)
class RetrievalConfig(ComposedConfig):
    """Everything a retrieval run depends on: ``load`` (:class:`attnlab.config.ModelSpec`; the model defaults to
    ``minilm-l6`` here) and ``retrieval`` (:class:`RetrievalSpec`). Build it from flat names:
    ``RetrievalConfig(lengths=(32, 128), variants=("temperature:tau=0.8",))``."""

    load: ModelSpec = field(default_factory=ModelSpec)
    retrieval: RetrievalSpec = field(default_factory=RetrievalSpec)

    def __init__(self, **values: Any) -> None:
        if values.get("model") is None and "load" not in values:
            values["model"] = "minilm-l6"
        super().__init__(**values)


@dataclass(frozen=True)
class RetrievalTask:
    """The queries and the documents of every length (see the module docstring).

    Attributes:
        queries: token ids of each query line (no special tokens). query_lines: their text.
        documents: ``{length: [ids, ...]}``, ``len(queries) + num_distractors`` documents (text tokens only; the
            encoder input adds ``prefix``/``suffix``): document i < len(queries) holds query i, the rest none.
        starts: ``{length: [index of query i's first token in document i]}``.
        depths: query i's target depth in [0, 1] (the same at every length).
        prefix, suffix: the special tokens the tokenizer puts around one sequence ([CLS] / [SEP] for BERT).
        sources: first line index (in the text's non-blank lines) of each filler passage, then of each query.
    """

    queries: list[list[int]]
    query_lines: list[str]
    documents: dict[int, list[list[int]]]
    starts: dict[int, list[int]]
    depths: list[float]
    prefix: list[int]
    suffix: list[int]
    sources: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_distractors(self) -> int:
        first = next(iter(self.documents.values()))
        return len(first) - len(self.queries)


def _key(ids: Sequence[int]) -> str:
    """Token ids as a str (one character per id), so containment is Python's fast substring test."""
    return "".join(map(chr, ids))


def _nearest_boundary(boundaries: list[int], target: float) -> int:
    return min(boundaries, key=lambda b: (abs(b - target), b))


def build_task(tokenizer: Any, text: str, *, lengths: Sequence[int], num_queries: int, num_distractors: int,
               min_query_tokens: int, max_query_tokens: int, seed: int = 0) -> RetrievalTask:
    """The queries and documents of a run (module docstring), drawn with ``random.Random(seed)`` from ``text``.

    Args:
        tokenizer: a Hugging Face tokenizer (lines are encoded without special tokens; :func:`special_tokens`
            gives what the encoder input adds). text: the whole text; its non-blank lines are the units.
        lengths: document lengths in tokens, special tokens included. num_queries, num_distractors: documents
            per length are ``num_queries + num_distractors``. min_query_tokens, max_query_tokens: query sizes.

    Returns:
        a :class:`RetrievalTask`; every document of length ``L`` has exactly ``L - specials`` token ids.

    Raises:
        ConfigError: a length too short for the longest allowed query plus one filler token, or the text has too
            few suitable lines or too little text for the passages.
    """
    prefix, suffix = special_tokens(tokenizer)
    specials = len(prefix) + len(suffix)
    shortest = min(lengths) - specials
    if shortest < max_query_tokens + 1:
        raise ConfigError(f"--lengths {min(lengths)} leaves {shortest} text tokens after {specials} special tokens; "
                          f"each length needs >= max_query_tokens + 1 = {max_query_tokens + 1}, so use lengths >= "
                          f"{max_query_tokens + 1 + specials} or a smaller --max-query-tokens")
    longest = max(lengths) - specials
    rng = random.Random(seed)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    counts = Counter(" ".join(line.lower().split()) for line in lines)
    candidates = [i for i, line in enumerate(lines) if any(c.islower() for c in line)
                  and counts[" ".join(line.lower().split())] == 1]
    rng.shuffle(candidates)
    queries, query_lines, query_sources = [], [], []
    for chunk in range(0, len(candidates), 4 * num_queries):
        picked = candidates[chunk:chunk + 4 * num_queries]
        for index, ids in zip(picked, _encode_lines(tokenizer, [lines[i] for i in picked])):
            if min_query_tokens <= len(ids) <= max_query_tokens and len(queries) < num_queries:
                queries.append(ids)
                query_lines.append(lines[index])
                query_sources.append(index)
        if len(queries) == num_queries:
            break
    if len(queries) < num_queries:
        raise ConfigError(f"the text has {len(queries)} lines usable as queries ({min_query_tokens}–"
                          f"{max_query_tokens} tokens, with a lower-case letter, occurring once); {num_queries} "
                          "are needed: use a longer --text or fewer --queries")
    query_keys = [_key(q) for q in queries]
    fillers, filler_sources, taken = [], [], []
    attempts = 0
    while len(fillers) < num_queries + num_distractors:
        attempts += 1
        if attempts > 20 * (num_queries + num_distractors) + 100:
            raise ConfigError(f"found {len(fillers)} of {num_queries + num_distractors} passages of {longest} tokens "
                              "without a query in the text; use a longer --text or fewer queries/distractors")
        start = rng.randrange(len(lines))
        passage = _passage(tokenizer, lines, start, longest)
        if passage is None:
            continue
        ids, line_starts, end = passage
        if any(start < stop and begin < end for begin, stop in taken):
            continue  # overlaps a passage already drawn
        key = _key(ids)
        if any(q in key for q in query_keys):
            continue
        taken.append((start, end))
        fillers.append((ids, line_starts))
        filler_sources.append(start)
    depths = [rng.random() for _ in queries]
    documents: dict[int, list[list[int]]] = {}
    starts: dict[int, list[int]] = {}
    for length in lengths:
        size = length - specials
        docs, positions = [], []
        for i, query in enumerate(queries):
            ids, line_starts = fillers[i]
            room = size - len(query)
            boundaries = [b for b in line_starts if b <= room] + [room]
            cut = _nearest_boundary(boundaries, depths[i] * room)
            docs.append(ids[:cut] + query + ids[cut:room])
            positions.append(cut)
        docs += [fillers[num_queries + j][0][:size] for j in range(num_distractors)]
        for d, doc in enumerate(docs):  # a query may only appear in its own document (also across a boundary)
            key = _key(doc)
            for q, query_key in enumerate(query_keys):
                if q != d and query_key in key:
                    raise ConfigError(f"query {q} ({query_lines[q]!r}) also occurs in document {d} of length "
                                      f"{length}; use another --seed")
        documents[length], starts[length] = docs, positions
    return RetrievalTask(queries=queries, query_lines=query_lines, documents=documents, starts=starts,
                         depths=depths, prefix=prefix, suffix=suffix,
                         sources={"passages": filler_sources, "queries": query_sources})


def _encode_lines(tokenizer: Any, lines: list[str]) -> list[list[int]]:
    if not lines:
        return []
    return [list(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]


def _passage(tokenizer: Any, lines: list[str], start: int, size: int) -> tuple[list[int], list[int], int] | None:
    """``size`` tokens of whole lines from line ``start`` on (the last one cut), the token index where each line
    starts, and the index of the line after the last one used; None if the text ends first."""
    ids: list[int] = []
    line_starts: list[int] = []
    index, block = start, 64
    while len(ids) < size:
        if index >= len(lines):
            return None
        for line_ids in _encode_lines(tokenizer, lines[index:index + block]):
            index += 1
            if not line_ids:
                continue
            line_starts.append(len(ids))
            ids += line_ids
            if len(ids) >= size:
                break
    return ids[:size], line_starts, index


@torch.no_grad()
def embed(model: Any, sequences: Sequence[Sequence[int]], *, pad_id: int, batch_size: int,
          device: str | torch.device = "cpu", notify: Progress | None = None, message: str = "") -> Tensor:
    """Mean-pooled last hidden states of ``sequences`` (token ids with their special tokens), run in batches of
    ``batch_size`` sorted by length (right padding with ``pad_id``, attention_mask 0); returns (n, hidden_size)
    float64 in the input order. Runs under whatever Session is active, so its edits apply. ``notify`` (if given)
    is called after each batch as ``notify(sequences in the batch, 0, message)``; the caller keeps the count."""
    from attnlab.analyses.length_collapse import mean_pool

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: Tensor | None = None
    for begin in range(0, len(order), batch_size):
        chunk = order[begin:begin + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (batch, width)
        valid = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, i in enumerate(chunk):
            input_ids[row, :len(sequences[i])] = torch.tensor(list(sequences[i]), dtype=torch.long)
            valid[row, :len(sequences[i])] = True
        output = model(input_ids=input_ids.to(device), attention_mask=valid.long().to(device),
                       output_hidden_states=True)
        hidden = getattr(output, "last_hidden_state", None)
        hidden = output.hidden_states[-1] if hidden is None else hidden  # (batch, width, hidden_size)
        pooled = mean_pool(hidden.cpu(), valid)
        if out is None:
            out = torch.zeros(len(sequences), pooled.shape[-1], dtype=torch.float64)
        out[chunk] = pooled
        if notify is not None:
            notify(len(chunk), 0, message)
    if out is None:
        raise ConfigError("embed needs at least one sequence")
    return out


def positive_ranks(query_embeddings: Tensor, document_embeddings: Tensor) -> tuple[Tensor, Tensor]:
    """Rank of each query's own document among all documents by cosine similarity.

    Args:
        query_embeddings: (num_queries, hidden_size). document_embeddings: (num_documents, hidden_size),
            num_documents >= num_queries; document i is query i's positive, the rest are distractors.

    Returns:
        ranks (num_queries,) long, 1 = best: ``1 + #(other documents with cosine >= the positive's)``;
        cosine (num_queries, num_documents) float64.
    """
    n = query_embeddings.shape[0]
    if document_embeddings.shape[0] < n or query_embeddings.shape[-1] != document_embeddings.shape[-1]:
        raise ConfigError(f"need (num_queries, D) queries and (>= num_queries, D) documents, got "
                          f"{tuple(query_embeddings.shape)} and {tuple(document_embeddings.shape)}")
    q = torch.nn.functional.normalize(query_embeddings.double(), dim=-1)
    d = torch.nn.functional.normalize(document_embeddings.double(), dim=-1)
    cosine = q @ d.T  # (num_queries, num_documents)
    positive = cosine[torch.arange(n), torch.arange(n)]
    beats = cosine >= positive[:, None]
    beats[torch.arange(n), torch.arange(n)] = False
    return 1 + beats.sum(-1), cosine


def rank_summary(ranks: Tensor) -> dict[str, float]:
    """top1, its Wilson 95 % interval (top1_low, top1_high), mrr, mrr_se and n from ranks (1 = best)."""
    n = int(ranks.numel())
    hits = int((ranks == 1).sum())
    reciprocal = 1.0 / ranks.double()
    low, high = wilson_interval(hits, n)
    se = float(reciprocal.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
    return {"top1": hits / n, "top1_low": low, "top1_high": high,
            "mrr": float(reciprocal.mean()), "mrr_se": se, "n": n}


def paired_top1(baseline_ranks: Tensor, ranks: Tensor) -> dict[str, float]:
    """Queries gained and lost at top-1 against the baseline, and McNemar's exact two-sided p
    (:func:`attnlab.stats.intervals.paired_binary`)."""
    return paired_binary((baseline_ranks == 1).tolist(), (ranks == 1).tolist())


def _mean_pairwise_cosine(embeddings: Tensor) -> float:
    unit = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    cosine = unit @ unit.T
    off = ~torch.eye(len(unit), dtype=torch.bool)
    return float(cosine[off].mean())


def score_length(query_embeddings: Tensor, document_embeddings: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Ranks (num_queries,) and the statistics of one variant at one length (module docstring; the paired ones
    come from :func:`paired_top1`). Shapes as in :func:`positive_ranks`; cosines are float, in [-1, 1]."""
    ranks, cosine = positive_ranks(query_embeddings, document_embeddings)
    n = len(ranks)
    positive = cosine[torch.arange(n), torch.arange(n)]
    others = cosine.clone()
    others[torch.arange(n), torch.arange(n)] = math.nan
    stats = {**rank_summary(ranks), "positive_cosine": float(positive.mean()),
             "distractor_cosine": float(others.nanmean()),
             "doc_mean_cosine": _mean_pairwise_cosine(document_embeddings)}
    return ranks, stats


def run_retrieval(config: RetrievalConfig, *, progress: ProgressArg = None, model: Any = None,
                  tokenizer: Any = None) -> dict[str, Any]:
    """Build the task, embed it under the baseline and every variant, and return the results dict.

    ``model``/``tokenizer`` (or a LoadedModel as ``model``) reuse a loaded model. ``progress``: None, True
    (stderr) or a callable ``(done, total, message)`` (:mod:`attnlab.progress`).

    Raises:
        ConfigError, TextError, RegistryError: bad input (the CLI exits 2): lengths beyond the model's positions
            or too short for the queries, a text too short, an edit the model cannot take.
        EditNotFiredError: a requested edit never touched an attention call.
    """
    with progress_to(progress) as notify:
        return _run(config, notify, model, tokenizer)


def _run(config: RetrievalConfig, notify: Progress, model: Any, tokenizer: Any) -> dict[str, Any]:
    from attnlab.evaluation.config import BASELINE, parse_variant
    from attnlab.evaluation.runner import check_variants, edit_report, make_session, model_device
    from attnlab.pipeline import check_seq_len, results_envelope, start_run
    from attnlab.text import corpus_text, read_text_file

    started = time.perf_counter()
    spec = config.retrieval
    variants = [(BASELINE, [])] + [(edits, parse_variant(edits)) for edits in spec.variants]
    loaded = start_run(config.load, TextSpec(text=spec.text, seq_len=2), spec.seed, notify, model, tokenizer)
    model, tokenizer = loaded
    check_seq_len(loaded.facts, max(spec.lengths), "--lengths")
    check_variants(variants, loaded.facts)
    notify(0, 0, "building the task")
    text = read_text_file(spec.text) if spec.text is not None else corpus_text()
    task = build_task(tokenizer, text, lengths=spec.lengths, num_queries=spec.queries,
                      num_distractors=spec.distractors, min_query_tokens=spec.min_query_tokens,
                      max_query_tokens=spec.max_query_tokens, seed=spec.seed)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad_id = int(pad) if pad is not None else 0
    wrap = [task.prefix + q + task.suffix for q in task.queries]
    docs = {n: [task.prefix + d + task.suffix for d in task.documents[n]] for n in spec.lengths}
    per_variant = len(wrap) + sum(len(d) for d in docs.values())
    total, done = per_variant * len(variants), [0]

    def step(count: int, _: int, message: str) -> None:
        done[0] += count
        notify(done[0], total, message)

    device = model_device(model)
    rows: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    baseline_ranks: dict[int, Tensor] = {}
    for label, edits in variants:
        begun = time.perf_counter()
        session = make_session(model, edits)
        with session:
            queries = embed(model, wrap, pad_id=pad_id, batch_size=spec.batch_size, device=device, notify=step,
                            message=f"{label}: queries")
            for length in spec.lengths:
                documents = embed(model, docs[length], pad_id=pad_id, batch_size=spec.batch_size, device=device,
                                  notify=step, message=f"{label}: documents of {length} tokens")
                ranks, stats = score_length(queries, documents)
                if label == BASELINE:
                    baseline_ranks[length] = ranks
                stats.update(paired_top1(baseline_ranks[length], ranks))
                table.append({"variant": label, "length": length, **stats})
                rows += [_row(label, key, value, length) for key, value in stats.items() if key != "n"]
        records.append({"label": label, "edits": [edit.spec() for edit in edits],
                        "edit_report": edit_report(session, edits),
                        "attention_paths": {str(k): v for k, v in sorted(session.attention_paths.items())},
                        "seconds": round(time.perf_counter() - begun, 3)})
    extras = {PROBE: _extras(task, spec, table, records, tokenizer)}
    return results_envelope(
        "protocol retrieval", config, loaded, bos_policy="the tokenizer's special tokens", bos_added=bool(task.prefix),
        attention_paths={int(k): v for k, v in records[0]["attention_paths"].items()}, windows=[], rows=rows,
        started=started, extras=extras, sections={PROBE: [_section().to_dict()]})


def _row(variant: str, statistic: str, value: float, length: int) -> dict[str, Any]:
    return {"probe": PROBE, "variant": variant, "statistic": statistic, "layer": None, "head": None,
            "position": length, "value": float(value)}


def _extras(task: RetrievalTask, spec: RetrievalSpec, table: list[dict[str, Any]], records: list[dict[str, Any]],
            tokenizer: Any) -> dict[str, Any]:
    query_tokens = [len(q) for q in task.queries]
    first = min(spec.lengths)
    return {
        "table": table, "variants": records, "definitions": DEFINITIONS,
        "num_queries": len(task.queries), "num_distractors": task.num_distractors,
        "num_documents": len(task.queries) + task.num_distractors, "lengths": list(spec.lengths),
        "special_tokens": len(task.prefix) + len(task.suffix),
        "query_tokens": f"{min(query_tokens)}–{max(query_tokens)} (mean {sum(query_tokens) / len(query_tokens):.1f})",
        "queries": task.query_lines, "depths": [round(d, 4) for d in task.depths],
        "starts": {str(n): s for n, s in task.starts.items()}, "sources": task.sources,
        "example": {"query": task.query_lines[0], "length": first,
                    "document": tokenizer.decode(task.documents[first][0])},
        "pooling": "mean over real tokens (special tokens included), cosine similarity",
    }


def _section() -> Any:
    from attnlab.report.sections import Column, Section, Table, Text

    columns = (Column("variant", "variant", format="text"), Column("length", "length (tokens)"),
               Column("top1", "top-1"), Column("top1_low", "95 % low"), Column("top1_high", "95 % high"),
               Column("mrr", "MRR"), Column("gained", "gained"), Column("lost", "lost"),
               Column("mcnemar_p", "McNemar p"), Column("positive_cosine", "cos(query, own doc)"),
               Column("distractor_cosine", "cos(query, other docs)"),
               Column("doc_mean_cosine", "docs' mean pairwise cos"))
    return Section("retrieval", "Retrieval by document length", (
        Text(template="{num_queries} queries (corpus lines of {query_tokens} tokens), each ranking "
                      "{num_documents} documents per length ({num_queries} holding one query each, "
                      "{num_distractors} distractors) by the cosine of mean-pooled embeddings. Lengths count "
                      "the encoder's tokens ({special_tokens} special tokens included)."),
        Table(columns, extras="table", title="Top-1 accuracy and MRR per variant and document length",
              caption="gained/lost: queries right/wrong at top-1 that the baseline had wrong/right; McNemar p: "
                      "exact two-sided."),
    ))
