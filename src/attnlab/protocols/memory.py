"""Few-shot memories: recognition, recall and retention of sentences a model has studied k times (after Orhan 2023,
"Recognition, recall, and retention of few-shot memories in large language models", arXiv 2303.17557).

METHODS.md has no entry for this paper; the protocol follows the paper's abstract and §2 as we read them (low
confidence on details the paper leaves to its code: optimizer settings, foil choice, the exact cue length).

    from attnlab.protocols.memory import MemorySpec, run_memory
    result = run_memory(model, tokenizer, MemorySpec(items=32, exposures=(0, 1, 2, 4)), progress=True)
    result["curves"]       # one record per (exposures, interference_steps): recognition, recall, NLLs, intervals

The protocol, step by step:

1. **Material** (:func:`build_material`). Candidate sentences come from a text (default: the bundled Shakespeare
   corpus; speaker headings and bracketed stage directions dropped, lines of a speech joined, split after
   ``.``/``!``/``?``), kept when they have 6–40 words, and are visited in an order drawn from ``seed``. Each
   sentence is tokenized without special tokens (``x_1 … x_n``, ``min_tokens ≤ n ≤ max_tokens``). The first
   ``items`` sentences become the **studied** items; each studied item gets as its **foil** the next visited
   sentence with exactly its token count (so the two are scored over the same number of tokens); every other
   visited sentence in range is **interference** text, until ``max(retention_steps) · batch_size`` of them are
   collected. With ``material="shuffled"`` the words of studied items and foils are shuffled (seeded per
   sentence; the paper's contrast of natural sentences with less structured strings), interference stays natural.
2. **Study**: from the original weights, ``k`` epochs over the studied items (epoch ``e`` in an order seeded by
   ``(seed, e)``, batches of ``batch_size``), plain causal-LM loss on every token
   (:mod:`attnlab.protocols.finetune`, AdamW, constant ``lr``); ``k = 0`` is the unexposed baseline. One run of
   ``max(exposures)`` epochs is tested after each epoch ``k`` in ``exposures``: since its first ``k`` epochs are
   exactly those of a run of ``k`` epochs, this equals separate runs per k. Retention branches off that run
   (:meth:`attnlab.protocols.finetune.Finetuner.state`) and the run resumes from the branch point. By default the
   interference updates continue the study's AdamW state (``retention_optimizer="continue"``, one ongoing run, as
   in the paper); ``"reset"`` starts them with fresh moments, which separates forgetting from the momentum the
   study leaves behind.
3. **Test** (:func:`score_memory`), right after study and again after ``s`` updates on interference text for every
   ``s`` in ``retention_steps`` (interference batch ``j`` is the same for every k):

   - *recognition* (two-alternative forced choice): the studied sentence is recognised when its mean per-token
     NLL is strictly lower than its foil's (ties count as not recognised);
   - *recall*: cued with the first ``⌊n/2⌋`` tokens, greedy decoding reproduces the remaining ``⌈n/2⌉`` tokens
     exactly (``recall_exact``); ``recall_tokens`` is the fraction of those tokens that are the arg-max
     prediction given the true prefix. Both come from one teacher-forced pass: greedy decoding reproduces the
     target iff every target token is the arg-max given the true prefix (ties: lowest id);
   - 95 % Wilson intervals for recognition and exact recall (:func:`attnlab.stats.intervals.wilson_interval`).

A start token is prepended to every sequence when ``bos`` asks for it (``auto``: iff the tokenizer adds one
itself; then every sentence token is scored, else ``x_1`` is not). The model is restored to its original weights
at the end.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch

from attnlab.config import ComposedConfig, ModelSpec
from attnlab.errors import ConfigError, TextError
from attnlab.params import Range, coerce
from attnlab.progress import Progress, takes_progress
from attnlab.protocols.finetune import FinetuneConfig, Finetuner, TokenLosses, make_batch, shuffled_batches
from attnlab.protocols.finetune import token_losses
from attnlab.stats.intervals import wilson_interval

__all__ = ["MemoryConfig", "MemoryItem", "MemoryMaterial", "MemorySpec", "build_material", "corpus_sentences",
           "curve_rows", "memory_results", "run_memory", "score_memory"]

METRICS = ("recognition", "recall_exact", "recall_tokens", "nll_studied", "nll_foil")
"""The statistics of one test, in the order rows are written."""


def _listed(default: Any) -> Any:
    """A list field whose option text (``"0,1,2,4"``) reaches :class:`MemorySpec` unsplit: its ``__post_init__``
    parses it (``parse`` metadata of :mod:`attnlab.config`)."""
    return dataclasses.field(default=default, metadata={"parse": lambda value: value})


@dataclass(frozen=True)
class MemorySpec:
    """The settings of one memory run (see the module docstring).

    Attributes:
        items: studied sentences (each with a foil). exposures: the k values (epochs over the studied items).
        retention_steps: interference updates after which memory is tested again (0 = right after study).
        retention_exposures: the k values whose retention is followed (None = every k > 0 of ``exposures``).
        retention_optimizer: ``continue`` (interference updates keep the study's AdamW moments, as one ongoing
            training run does) or ``reset`` (fresh AdamW state when the interference text starts).
        material: ``sentences`` (as written) or ``shuffled`` (words of studied items and foils shuffled).
        text: a UTF-8 file of source text (None = the bundled corpus).
        min_tokens, max_tokens: token-count range of the sentences used.
        lr, batch_size: AdamW learning rate and sequences per update (study and interference).
        eval_batch_size: sequences per forward pass when testing. bos: ``auto`` | ``always`` | ``never``.
        seed: sentence order, word shuffles, batch orders and dropout.
    """

    items: Annotated[int, Range(ge=1, le=100000)] = 32
    exposures: tuple[Annotated[int, Range(ge=0, le=10000)], ...] = _listed((0, 1, 2, 4))
    retention_steps: tuple[Annotated[int, Range(ge=0, le=1000000)], ...] = _listed((0, 1, 2, 5, 10, 20))
    retention_exposures: tuple[Annotated[int, Range(ge=1, le=10000)], ...] | None = _listed(None)
    retention_optimizer: Literal["continue", "reset"] = "continue"
    material: Literal["sentences", "shuffled"] = "sentences"
    text: str | None = None
    min_tokens: Annotated[int, Range(ge=2, le=4096)] = 10
    max_tokens: Annotated[int, Range(ge=2, le=4096)] = 24
    lr: Annotated[float, Range(gt=0, le=10)] = 1e-4
    batch_size: Annotated[int, Range(ge=1, le=65536)] = 8
    eval_batch_size: Annotated[int, Range(ge=1, le=65536)] = 32
    bos: Literal["auto", "always", "never"] = "auto"
    seed: Annotated[int, Range(ge=0)] = 0

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(MemorySpec, include_extras=True)
        for item in dataclasses.fields(self):
            object.__setattr__(self, item.name, coerce(getattr(self, item.name), hints[item.name], owner="memory",
                                                       param=item.name))
        for name in ("exposures", "retention_steps"):
            values = getattr(self, name)
            if not values or list(values) != sorted(set(values)):
                raise ConfigError(f"memory: {name} must be distinct values in increasing order, got {list(values)}")
        if self.retention_exposures is not None and not set(self.retention_exposures) <= set(self.exposures):
            raise ConfigError(f"memory: retention_exposures must be among exposures {list(self.exposures)}, got "
                              f"{list(self.retention_exposures)}")
        if self.min_tokens > self.max_tokens:
            raise ConfigError(f"memory: min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")

    @property
    def followed(self) -> tuple[int, ...]:
        """The k values whose retention is followed."""
        if self.retention_exposures is not None:
            return self.retention_exposures
        return tuple(k for k in self.exposures if k > 0)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class MemoryItem:
    """One studied sentence and its foil. ``studied_ids``/``foil_ids`` are the token ids fed (start token
    included when prepended), of equal length; ``cue_len`` counts the ids of the cue (start token + ``⌊n/2⌋``
    sentence tokens)."""

    studied: str
    foil: str
    studied_ids: tuple[int, ...]
    foil_ids: tuple[int, ...]
    cue_len: int


@dataclass(frozen=True)
class MemoryMaterial:
    """The items, the interference sequences (token ids, start token included when prepended) and the number of
    candidate sentences visited."""

    items: tuple[MemoryItem, ...]
    interference: tuple[tuple[int, ...], ...]
    visited: int


_SPEAKER = re.compile(r"^[A-Z][A-Z0-9 ,.'&-]*\.$")  # "CAESAR." / "FIRST CITIZEN."
_BRACKETS = re.compile(r"\[[^\]]*\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def corpus_sentences(text: str, *, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Sentences of a play-like text, in order, without repeats.

    Paragraphs are split at blank lines; lines that are speaker headings (upper case ending in ``.``) are dropped,
    bracketed stage directions removed, the remaining lines joined by spaces and split after ``.``, ``!``, ``?``.
    A sentence is kept when it starts with an upper-case letter, ends with ``.``/``!``/``?``, has ``min_words`` to
    ``max_words`` words and no all-capital word of 3+ letters (headings such as ``ACT II.``).
    """
    out: dict[str, None] = {}
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.splitlines()]
        speech = " ".join(line for line in lines if line and not _SPEAKER.match(line))
        speech = re.sub(r"\s+", " ", _BRACKETS.sub(" ", speech)).strip()
        for sentence in _SENTENCE_END.split(speech):
            words = sentence.split()
            if (min_words <= len(words) <= max_words and sentence[:1].isupper() and sentence[-1] in ".!?"
                    and not any(len(w) >= 3 and w.isalpha() and w.isupper() for w in words)):
                out.setdefault(sentence, None)
    return list(out)


def _shuffle_words(sentence: str, seed: int) -> str:
    words = sentence.split()
    order = np.random.default_rng(seed).permutation(len(words))
    return " ".join(words[i] for i in order)


def start_ids(tokenizer: Any, bos: str) -> list[int]:
    """``[start token id]`` when the ``bos`` policy prepends one (``always``; ``auto`` iff the tokenizer adds one
    itself, :func:`attnlab.text.tokenizer_adds_bos`), else ``[]``. ConfigError for ``always`` without one."""
    from attnlab.text import start_token_id, tokenizer_adds_bos

    start = start_token_id(tokenizer)
    if bos == "always" and start is None:
        raise ConfigError("memory: bos=always needs a tokenizer with a bos (or cls) token; this one has none")
    add = start is not None and (bos == "always" or (bos == "auto" and tokenizer_adds_bos(tokenizer)))
    return [int(start)] if add else []


def build_material(tokenizer: Any, spec: MemorySpec, sentences: Sequence[str] | None = None) -> MemoryMaterial:
    """Studied items, their foils and the interference text (see the module docstring, step 1).

    Args:
        tokenizer: a Hugging Face tokenizer (ids are taken without special tokens).
        spec: the run's settings (items, retention_steps, batch_size, material, min/max_tokens, bos, seed).
        sentences: candidate sentences; None = :func:`corpus_sentences` of ``spec.text`` or the bundled corpus.

    Raises TextError (one line) when the candidates cannot supply ``items`` pairs and the interference text.
    """
    from attnlab.text import corpus_text, read_text_file

    if sentences is None:
        sentences = corpus_sentences(read_text_file(spec.text) if spec.text else corpus_text())
    prefix = start_ids(tokenizer, spec.bos)
    need_interference = max(spec.retention_steps) * spec.batch_size if spec.followed else 0
    order = np.random.default_rng(spec.seed).permutation(len(sentences))
    waiting: dict[int, list[int]] = {}  # token count -> indices into `studied` still without a foil
    studied: list[tuple[str, list[int]]] = []
    foils: dict[int, tuple[str, list[int]]] = {}
    interference: list[tuple[int, ...]] = []

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    visited = 0
    for visited, index in enumerate(order.tolist(), start=1):
        natural = sentences[index]
        shown = _shuffle_words(natural, spec.seed * 1_000_003 + index) if spec.material == "shuffled" else natural
        ids = encode(shown)
        if spec.min_tokens <= len(ids) <= spec.max_tokens:
            if waiting.get(len(ids)):
                foils[waiting[len(ids)].pop(0)] = (shown, ids)
                continue
            if len(studied) < spec.items:
                waiting.setdefault(len(ids), []).append(len(studied))
                studied.append((shown, ids))
                continue
        if len(interference) < need_interference:
            plain = ids if shown is natural else encode(natural)
            if spec.min_tokens <= len(plain) <= spec.max_tokens:
                interference.append(tuple(prefix + plain))
        if len(foils) == spec.items and len(interference) >= need_interference:
            break
    if len(foils) < spec.items or len(interference) < need_interference:
        raise TextError(f"memory: the text gave {len(foils)} studied/foil pairs of {spec.items} and "
                        f"{len(interference)} interference sentences of {need_interference} ({len(sentences)} "
                        f"candidate sentences, {spec.min_tokens}-{spec.max_tokens} tokens); use a longer text, "
                        "fewer items or a wider token range")
    items = tuple(MemoryItem(text, foils[i][0], tuple(prefix + ids), tuple(prefix + foils[i][1]),
                             len(prefix) + len(ids) // 2) for i, (text, ids) in enumerate(studied))
    return MemoryMaterial(items, tuple(interference), visited)


def _scores(model: Any, sequences: list[tuple[int, ...]], loss_start: int, batch_size: int) -> list[TokenLosses]:
    device = next(model.parameters()).device
    return [token_losses(model, make_batch(sequences[i:i + batch_size],
                                           loss_start=[loss_start] * len(sequences[i:i + batch_size])).to(device))
            for i in range(0, len(sequences), batch_size)]


def score_memory(model: Any, items: Sequence[MemoryItem], *, batch_size: int = 32) -> dict[str, Any]:
    """Recognition and recall of ``items`` by ``model`` (see the module docstring, step 3); no weights change.

    Returns ``{"recognition", "recall_exact", "recall_tokens"}`` (fractions of items, in [0, 1]),
    ``{"nll_studied", "nll_foil"}`` (mean over items of the per-token NLL, nats), the 95 % Wilson bounds
    ``recognition_low/high`` and ``recall_exact_low/high``, ``items`` (count) and ``per_item`` (lists of
    ``recognised``, ``recalled`` (bools), ``nll_studied``, ``nll_foil`` per item).
    """
    if not items:
        raise ConfigError("memory: score_memory needs at least one item")
    first = 1  # tokens 1 … n-1 of the fed ids are scored (all sentence tokens when a start token is prepended)
    studied = _scores(model, [item.studied_ids for item in items], first, batch_size)
    foils = _scores(model, [item.foil_ids for item in items], first, batch_size)
    nll_s = torch.cat([s.mean_nll() for s in studied]).tolist()
    nll_f = torch.cat([s.mean_nll() for s in foils]).tolist()
    recognised = [a < b for a, b in zip(nll_s, nll_f)]
    recalled, token_hits = [], []
    rows = [(score, row) for score in studied for row in range(score.correct.shape[0])]
    for item, (score, row) in zip(items, rows):
        hits = score.correct[row, item.cue_len:len(item.studied_ids)]  # the second half's tokens
        recalled.append(bool(hits.all()))
        token_hits.append(float(hits.float().mean()))
    count = len(items)
    result: dict[str, Any] = {
        "recognition": sum(recognised) / count, "recall_exact": sum(recalled) / count,
        "recall_tokens": sum(token_hits) / count, "nll_studied": sum(nll_s) / count, "nll_foil": sum(nll_f) / count,
        "items": count}
    for name, successes in (("recognition", sum(recognised)), ("recall_exact", sum(recalled))):
        result[f"{name}_low"], result[f"{name}_high"] = wilson_interval(int(successes), count)
    result["per_item"] = {"recognised": recognised, "recalled": recalled, "nll_studied": nll_s, "nll_foil": nll_f}
    return result


@takes_progress
def run_memory(model: Any, tokenizer: Any, spec: MemorySpec | None = None, *, material: MemoryMaterial | None = None,
               progress: Progress) -> dict[str, Any]:
    """The whole protocol (module docstring): material, then per k study, test, and retention tests.

    Args:
        model: a causal LM (trained in place, restored to its original weights at the end).
        tokenizer: its tokenizer. spec: settings (default :class:`MemorySpec`).
        material: prebuilt material (default :func:`build_material` of ``spec``).
        progress: ``progress(done, total, message)`` after every update and every test.

    Returns ``{"curves": [record per (exposures, interference_steps)], "study_loss": {k: last study loss},
    "items": [{"studied", "foil", "tokens"}], "interference_sentences": int, "visited": int}``; each curve record
    holds ``exposures``, ``interference_steps``, ``followed`` (k's retention is followed), ``updates`` (study +
    interference updates behind the test) and the
    numbers of :func:`score_memory` without ``per_item``, plus ``recognised``/``recalled`` per item.
    """
    spec = spec or MemorySpec()
    material = material or build_material(tokenizer, spec)
    studied = [item.studied_ids for item in material.items]
    per_epoch = math.ceil(len(studied) / spec.batch_size)
    last = max(spec.retention_steps)
    later_tests = sum(1 for s in spec.retention_steps if s > 0)
    total = (max(spec.exposures) * per_epoch + len(spec.exposures)
             + len(spec.followed) * (last + later_tests))
    done, curves, study_loss = 0, [], {}
    original = {name: value.detach().clone() for name, value in model.state_dict().items()}
    tuner = Finetuner(model, FinetuneConfig(lr=spec.lr, seed=spec.seed))

    def test(k: int, steps: int) -> None:
        nonlocal done
        scores = score_memory(model, material.items, batch_size=spec.eval_batch_size)
        per_item = scores.pop("per_item")
        curves.append({"exposures": k, "interference_steps": steps, "followed": k in spec.followed,
                       "updates": tuner.steps_done, **scores,
                       "recognised": per_item["recognised"], "recalled": per_item["recalled"]})
        done += 1
        progress(done, total, f"k={k} after {steps} interference updates: recognition {scores['recognition']:.2f}, "
                              f"recall {scores['recall_exact']:.2f}")

    try:
        for epoch in range(max(spec.exposures) + 1):  # epoch = exposures so far
            if epoch > 0:
                for batch in shuffled_batches(studied, spec.batch_size, seed=spec.seed * 10_007 + epoch - 1):
                    study_loss[epoch] = tuner.step(batch)
                    done += 1
                    progress(done, total, f"study update {tuner.steps_done}/{max(spec.exposures) * per_epoch}: "
                                          f"loss {study_loss[epoch]:.3f}")
            if epoch not in spec.exposures:
                continue
            test(epoch, 0)
            if epoch not in spec.followed or last == 0:
                continue
            branch = tuner.state()
            if spec.retention_optimizer == "reset":
                tuner.reset_optimizer()
            for step in range(1, last + 1):
                rows = material.interference[(step - 1) * spec.batch_size:step * spec.batch_size]
                loss = tuner.step(make_batch(rows))
                done += 1
                progress(done, total, f"k={epoch} interference update {step}/{last}: loss {loss:.3f}")
                if step in spec.retention_steps:
                    test(epoch, step)
            tuner.load_state(branch)
    finally:
        model.load_state_dict(original)
    items = [{"studied": item.studied, "foil": item.foil, "tokens": len(item.studied_ids)} for item in material.items]
    return {"curves": curves, "study_loss": study_loss, "items": items,
            "interference_sentences": len(material.interference), "visited": material.visited}


# the command's run: config, model loading, results dict ---------------------------------------------------------
@dataclass(frozen=True, init=False)
class MemoryConfig(ComposedConfig):
    """Everything ``attnlab protocol memory`` depends on; saved (flat) in results.json's ``config``.

    ``load`` (:class:`attnlab.config.ModelSpec`) and ``memory`` (:class:`MemorySpec`); build from flat names:
    ``MemoryConfig(model="smollm2-135m", items=16, exposures="0,1,2")``.
    """

    load: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    memory: MemorySpec = dataclasses.field(default_factory=MemorySpec)


def curve_rows(curves: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The long-format rows of results.json/CSV (probe ``memory``, ``position`` = k, ``variant`` = ``k=K``).

    Right after study (``interference_steps`` 0) each statistic of :data:`ROW_STATISTICS` is one row without a
    step; every test of a followed k is also a row ``retained_<statistic>`` with ``step`` = interference updates.
    """
    rows = []
    for record in curves:
        k, steps = record["exposures"], record["interference_steps"]
        base = {"probe": "memory", "variant": f"k={k}", "layer": None, "head": None, "position": k}
        for name in ROW_STATISTICS:
            if steps == 0:
                rows.append({**base, "statistic": name, "value": record[name]})
            if steps > 0 or record.get("followed"):
                rows.append({**base, "statistic": f"retained_{name}", "value": record[name], "step": steps})
    return rows


ROW_STATISTICS = METRICS + ("recognition_low", "recognition_high", "recall_exact_low", "recall_exact_high")
"""Statistics of the rows (:func:`curve_rows`)."""


def report_sections(spec: MemorySpec) -> list[dict[str, Any]]:
    """The report's section for a run: recognition and recall against k, and one retention curve per followed k."""
    from attnlab.report.sections import PositionCurve, Section, Series, StepCurve

    parts: list[Any] = [PositionCurve(
        series=(Series("recognition", "recognition (2-AFC)"), Series("recall_exact", "exact recall"),
                Series("recall_tokens", "recalled tokens", dashed=True)),
        title="Memory right after study", xlabel="exposures k", ylabel="fraction of items", ylim=(0.0, 1.0),
        caption="Recognition: studied sentence has lower mean NLL than a same-length foil. Recall: greedy "
                "completion of the second half from the first half is exact.")]
    for k in spec.followed:
        parts.append(StepCurve(
            series=(Series("retained_recognition", f"recognition, k={k}", position=k),
                    Series("retained_recall_exact", f"exact recall, k={k}", position=k)),
            title=f"Retention after k={k} exposures", xlabel="updates on other text", ylabel="fraction of items",
            ylim=(0.0, 1.0)))
    return [Section("memory", "Few-shot memories (Orhan 2023)", tuple(parts)).to_dict()]


@takes_progress
def memory_results(config: MemoryConfig, *, model: Any = None, tokenizer: Any = None,
                   progress: Progress) -> dict[str, Any]:
    """Load the model (unless given), run :func:`run_memory`, return the results dict that
    :func:`attnlab.report.io.write_results` writes: the common envelope (:func:`attnlab.pipeline.results_envelope`),
    ``rows`` (:func:`curve_rows`), ``sections`` and ``memory`` (:func:`run_memory`'s dict plus ``settings``).

    ``model``/``tokenizer`` reuse a loaded model (both, or a LoadedModel as ``model``); ConfigError if only one
    is given (it would otherwise be ignored and the model reloaded from ``config.load``)."""
    import random
    import time

    from attnlab.capture.loading import LoadedModel, load_model
    from attnlab.pipeline import results_envelope

    started = time.perf_counter()
    spec = config.memory
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    if isinstance(model, LoadedModel):
        loaded = model
    elif (model is None) != (tokenizer is None):
        raise ConfigError(f"memory_results needs both model and tokenizer (or a LoadedModel as model), got only the "
                          f"{'model' if tokenizer is None else 'tokenizer'}")
    elif model is not None:
        loaded = LoadedModel.wrap(model, tokenizer)
    else:
        progress(0, 0, f"loading model {config.load.model}")
        loaded = load_model(config.load.model, dtype=config.load.dtype, device=config.load.device,
                            tokenizer=config.load.tokenizer)
    material = build_material(loaded.tokenizer, spec)
    result = run_memory(loaded.model, loaded.tokenizer, spec, material=material, progress=progress)
    return results_envelope("protocol memory", config, loaded, bos_policy=spec.bos,
                            bos_added=bool(start_ids(loaded.tokenizer, spec.bos)),
                            attention_paths={}, windows=[], rows=curve_rows(result["curves"]), started=started,
                            sections={"memory": report_sections(spec)}, memory=result)
