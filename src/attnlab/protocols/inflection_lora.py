"""Diagnose, then LoRA at the inflection layers (Wang 2025, "Attention Saturation and Gradient Suppression at
Inflection Layers", arXiv 2511.00797; METHODS.md #5, medium confidence for the metrics, low for the protocol).

The paper's protocol, at CPU scale on local data:

1. **Source.** An encoder with a classification head (mean-pooled last hidden state → linear) is fine-tuned fully
   on a source task for ``under_steps`` (regime UNDER) or ``over_steps`` (regime OVER) steps. The paper's source is
   BERT-base on SST-2; ours is MiniLM-L6 classifying single corpus lines by the play they come from, over the
   source plays.
2. **Diagnose.** The :mod:`attnlab.analyses.inflection` analysis runs on the source model with the classification
   loss (cross-entropy of the source labels) in place of the next-token loss, on ``diagnose_lines`` source training
   lines: per-layer attention entropy, ‖∂L/∂h_l‖ and ‖∇θ(l) L‖ (one backward pass per line), and the band by the
   rule stated there (percentile ranks; ours, the paper gives no thresholds).
3. **Adapt.** A fresh head for the target task (other plays, new labels; the paper's target is Rotten Tomatoes)
   is trained with the source encoder frozen and LoRA adapters (peft ``LoraConfig(target_modules=...,
   layers_to_transform=...)``) placed at the diagnosed band (``inflection``), at every layer (``all``) or nowhere
   (``none``: the head alone). Every placement of a regime starts from the same head initialisation and sees the
   same batches.
4. **Report** target accuracy (Wilson 95 % interval) and the trainable parameter count per regime × placement.

Lines: a play's lines are its text's lines (Project Gutenberg header and footer dropped) that have at least
``min_words`` words, with speaker tags (a line in capitals ending in ".") and stage directions (starting with "[",
"Enter " or "Exit"/"Exeunt") removed; duplicates are dropped, then train and test lines are drawn without overlap
by ``random.Random(seed)``, the same number per play. With ``lines_per_item`` k > 1 an item is k consecutive kept
lines joined by a space (the play's kept lines cut into non-overlapping runs of k), and the counts are items.

Shape legend: batch = lines in a batch, seq_len = tokens of the longest line (at most ``max_tokens``, special
tokens included), num_labels = plays of the task.
"""

from __future__ import annotations

import copy
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.capture.runner import ModelRunner
from attnlab.config import INT_LIMIT, SEED_LIMIT, ComposedConfig, ModelSpec, check_range, check_types
from attnlab.errors import ConfigError
from attnlab.progress import Progress, ProgressArg, progress_to

logger = logging.getLogger(__name__)

__all__ = ["InflectionLoraConfig", "InflectionLoraSpec", "LineTask", "MeanPoolClassifier", "PLACEMENTS", "REGIMES",
           "add_lora", "build_tasks", "diagnose", "evaluate", "fit", "play_lines", "run_inflection_lora",
           "trainable_parameters"]

PROBE = "inflection_lora"
REGIMES = ("under", "over")
PLACEMENTS = ("inflection", "all", "none")
_SPEAKER = re.compile(r"^[A-Z][A-Z0-9 ,.'&\-]*\.$")
_DIRECTION = re.compile(r"^(\[|Enter |Exit|Exeunt|Re-enter )")


def _names(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(item).strip() for item in items if str(item).strip())


@dataclass(frozen=True)
class InflectionLoraSpec:
    """The protocol's settings (defaults: the findings run, docs/findings/inflection_lora.md).

    Attributes:
        source_plays, target_plays: class names: corpus plays (file stems without ``_gut``, e.g. ``hamlet``) or,
            with ``text_dir``, the stems of its ``.txt`` files; at least 2 each, no play on both sides.
        text_dir: a folder of UTF-8 ``.txt`` files, one class per file; None = the bundled corpus.
        train_lines, test_lines: source lines per play for training / testing.
        target_train_lines: target lines per play for adaptation (the target test uses ``test_lines``).
        min_words: fewest words of a line. lines_per_item: consecutive kept lines per item (1 = single lines).
        max_tokens: items are cut to this many tokens (special tokens included).
        under_steps, over_steps: source fine-tuning steps of the UNDER and OVER regimes. source_lr: its AdamW rate.
        target_steps, target_lr: adaptation steps and AdamW rate (the same for every placement).
        batch_size: lines per step. lora_rank, lora_alpha: LoRA's r and alpha (scale alpha / r).
        lora_target: module names LoRA wraps inside each chosen block (BERT: query, value; Llama: q_proj, v_proj).
        diagnose_lines: source training lines the diagnosis reads (one backward pass each).
        band_width: the band rule's width (:func:`attnlab.analyses.inflection.inflection_band`).
        seed: data draw, head and LoRA initialisation, batch order and dropout.
    """

    source_plays: tuple[str, ...] = field(default=("hamlet", "macbeth", "othello", "lear"),
                                          metadata={"parse": _names})
    target_plays: tuple[str, ...] = field(default=("tempest", "twelfth_night", "midsummer_nights_dream",
                                                   "much_ado_about_nothing"), metadata={"parse": _names})
    text_dir: str | None = None
    train_lines: int = 64
    test_lines: int = 40
    target_train_lines: int = 32
    min_words: int = 5
    lines_per_item: int = 1
    max_tokens: int = 32
    under_steps: int = 6
    over_steps: int = 80
    source_lr: float = 2e-4
    target_steps: int = 30
    target_lr: float = 1e-3
    batch_size: int = 16
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_target: tuple[str, ...] = field(default=("query", "value"), metadata={"parse": _names})
    diagnose_lines: int = 24
    band_width: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        ints = ("train_lines", "test_lines", "target_train_lines", "min_words", "lines_per_item", "max_tokens",
                "under_steps",
                "over_steps", "target_steps", "batch_size", "lora_rank", "diagnose_lines", "seed")
        check_types(self, {**dict.fromkeys(ints, int), "source_lr": float, "target_lr": float,
                           "lora_alpha": float, "band_width": float})
        check_range(self, {**dict.fromkeys(ints, (1, INT_LIMIT)), "under_steps": (0, INT_LIMIT),
                           "max_tokens": (4, INT_LIMIT), "seed": (0, SEED_LIMIT)})
        for name in ("source_lr", "target_lr", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.band_width >= 0:
            raise ConfigError(f"band_width must be >= 0, got {self.band_width}")
        if self.under_steps >= self.over_steps:
            raise ConfigError(f"under_steps must be < over_steps, got {self.under_steps} >= {self.over_steps}")
        for name in ("source_plays", "target_plays", "lora_target"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or not all(isinstance(v, str) and v for v in values):
                raise ConfigError(f"{name} must be a list of names, got {values!r}")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name} names each entry once, got {list(values)}")
        if len(self.source_plays) < 2 or len(self.target_plays) < 2:
            raise ConfigError(f"source_plays and target_plays need >= 2 plays each, got {list(self.source_plays)} "
                              f"and {list(self.target_plays)}")
        if not self.lora_target:
            raise ConfigError("lora_target needs at least one module name, got none")
        shared = sorted(set(self.source_plays) & set(self.target_plays))
        if shared:
            raise ConfigError(f"a play cannot be both source and target, got {shared} on both sides")
        if isinstance(self.text_dir, Path):  # the CLI's --text-dir
            object.__setattr__(self, "text_dir", str(self.text_dir))
        if self.text_dir is not None and not isinstance(self.text_dir, str):
            raise ConfigError(f"text_dir must be a folder path, got {self.text_dir!r}")


@dataclass(frozen=True, init=False)
class InflectionLoraConfig(ComposedConfig):
    """``load`` (:class:`attnlab.config.ModelSpec`; model defaults to ``minilm-l6`` here) and ``protocol``
    (:class:`InflectionLoraSpec`), built from flat names: ``InflectionLoraConfig(over_steps=50)``."""

    load: ModelSpec = field(default_factory=ModelSpec)
    protocol: InflectionLoraSpec = field(default_factory=InflectionLoraSpec)

    def __init__(self, **values: Any) -> None:
        if values.get("model") is None and "load" not in values:
            values["model"] = "minilm-l6"
        super().__init__(**values)


# data ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LineTask:
    """Lines labelled by the play they come from: ``texts[i]`` has label ``labels[i]``, an index into ``classes``."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]


def play_lines(text: str, *, min_words: int) -> list[str]:
    """The distinct spoken lines of a play's text (rule in the module docstring), in text order."""
    from attnlab.text import strip_gutenberg

    seen: dict[str, None] = {}
    for raw in strip_gutenberg(text).splitlines():
        line = " ".join(raw.split())
        if len(line.split()) < min_words or _SPEAKER.match(line) or _DIRECTION.match(line):
            continue
        seen.setdefault(line, None)
    return list(seen)


def _play_texts(names: Sequence[str], text_dir: str | None) -> dict[str, str]:
    from attnlab.text import corpus_files, read_text_file

    if text_dir is None:
        files = {f.stem.removesuffix("_gut"): f for f in corpus_files()}
        where = "the bundled corpus"
    else:
        folder = Path(text_dir).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"text_dir must be a folder of .txt files, got {text_dir!r} (not a folder)")
        files = {f.stem: f for f in sorted(folder.glob("*.txt"))}
        where = f"{folder}"
    missing = [name for name in names if name not in files]
    if missing:
        raise ConfigError(f"unknown play(s) {missing} in {where}; available: {', '.join(sorted(files))}")
    return {name: read_text_file(files[name]) for name in names}


def build_tasks(plays: Sequence[str], *, train_per_play: int, test_per_play: int, min_words: int, seed: int,
                text_dir: str | None = None, lines_per_item: int = 1) -> tuple[LineTask, LineTask]:
    """(train, test) tasks over ``plays``, ``train_per_play`` / ``test_per_play`` disjoint items of each (an item
    is ``lines_per_item`` consecutive lines).

    Raises ConfigError when a play is unknown or has fewer than ``train_per_play + test_per_play`` items.
    """
    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, (name, text) in enumerate(_play_texts(plays, text_dir).items()):
        kept = play_lines(text, min_words=min_words)
        lines = [" ".join(kept[i : i + lines_per_item]) for i in range(0, len(kept) - lines_per_item + 1,
                                                                     lines_per_item)]
        need = train_per_play + test_per_play
        if len(lines) < need:
            raise ConfigError(f"play {name!r} has {len(lines)} items of {lines_per_item} line(s) of >= {min_words} "
                              f"words; need {need} "
                              f"({train_per_play} train + {test_per_play} test)")
        drawn = rng.sample(lines, need)
        train += [(line, label) for line in drawn[:train_per_play]]
        test += [(line, label) for line in drawn[train_per_play:]]
    rng.shuffle(train)

    def task(pairs: list[tuple[str, int]]) -> LineTask:
        return LineTask(tuple(t for t, _ in pairs), tuple(label for _, label in pairs), tuple(plays))

    return task(train), task(test)


def _encode(tokenizer: Any, texts: Sequence[str], max_tokens: int, device: Any) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (batch, seq_len), the tokenizer's special tokens added."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
    width = max(len(row) for row in ids)
    pad = getattr(tokenizer, "pad_token_id", None)
    input_ids = torch.full((len(ids), width), int(pad) if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


# model -----------------------------------------------------------------------------------------------------------
class MeanPoolClassifier(nn.Module):
    """``encoder`` (a transformers base model) → mean over real tokens of its last hidden state → ``head``.

    Mean pooling is how MiniLM (sentence-transformers) was trained to embed; it also needs no pooler weights.
    """

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.config.hidden_size), num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (batch, seq_len). Returns logits (batch, num_labels) float32."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        mask = attention_mask[..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)  # (B, D)
        return self.head(pooled).float()


def fit(classifier: nn.Module, tokenizer: Any, task: LineTask, *, steps: int, lr: float, batch_size: int,
        max_tokens: int, seed: int, notify: Progress | None = None, message: str = "training") -> list[float]:
    """``steps`` AdamW steps (weight decay 0) on the parameters that require grad, cross-entropy of the labels;
    batches walk seeded permutations of the task. Leaves the model in eval mode. Returns the loss of each step."""
    params = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    device = next(classifier.parameters()).device
    labels = torch.tensor(task.labels, dtype=torch.long, device=device)
    order: list[int] = []
    losses = []
    classifier.train()
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(len(task.texts), generator=generator).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        batch = _encode(tokenizer, [task.texts[i] for i in picked], max_tokens, device)
        loss = nn.functional.cross_entropy(classifier(**batch), labels[picked])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if notify is not None:
            notify(1, 0, message)
    classifier.eval()
    return losses


@torch.no_grad()
def evaluate(classifier: nn.Module, tokenizer: Any, task: LineTask, *, batch_size: int,
             max_tokens: int) -> dict[str, float]:
    """Accuracy on ``task`` with its Wilson 95 % interval (scipy), and the mean cross-entropy (nats)."""
    from scipy.stats import binomtest

    classifier.eval()
    device = next(classifier.parameters()).device
    correct, loss_sum = 0, 0.0
    for start in range(0, len(task.texts), batch_size):
        batch = _encode(tokenizer, task.texts[start : start + batch_size], max_tokens, device)
        labels = torch.tensor(task.labels[start : start + batch_size], dtype=torch.long, device=device)
        logits = classifier(**batch)
        correct += int((logits.argmax(-1) == labels).sum())
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
    n = len(task.texts)
    interval = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return {"accuracy": correct / n, "accuracy_low": float(interval.low), "accuracy_high": float(interval.high),
            "loss": loss_sum / n, "n": n}


# diagnosis -------------------------------------------------------------------------------------------------------
class ClassifierRunner(ModelRunner):
    """A :class:`attnlab.capture.runner.ModelRunner` over the classifier's encoder whose gradient pass uses the
    classification loss: ``forward(batch, gradients=True)`` backpropagates the mean cross-entropy of
    ``batch["labels"]`` (batch,) through the classifier; ``attention_probs`` ignores the labels."""

    def __init__(self, classifier: MeanPoolClassifier, tokenizer: Any = None) -> None:
        super().__init__(classifier.encoder, tokenizer)
        self.classifier = classifier

    def attention_probs(self, batch: dict[str, Tensor], *, with_values: bool = False) -> Any:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return super().attention_probs(inputs, with_values=with_values)

    def forward(self, batch: dict[str, Tensor], *, head_outputs: bool = False, gradients: bool = False,
                head_scale: dict[int, Tensor] | None = None, first_key: dict[int, Tensor] | None = None,
                edits: Sequence[Any] = ()) -> Any:
        from attnlab.analyses.base import ForwardRecord

        if head_outputs or head_scale or first_key or edits or not gradients:
            raise ConfigError("the classifier runner only runs gradient passes (no head outputs or edits)")
        record: dict[str, Any] = {"layers": {}, "heads": {}}
        with self._hooks(record, head_outputs=False, gradients=True), torch.enable_grad():
            logits = self.classifier(batch["input_ids"], batch["attention_mask"])
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        L = self.facts.num_layers
        layers = [record["layers"][i] for i in range(L)]
        params = [p for p in self.classifier.encoder.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, layers + params, allow_unused=True)
        act = torch.tensor([float(g.double().norm()) if g is not None else 0.0 for g in grads[:L]],
                           dtype=torch.float64)
        by_param = {id(p): g for p, g in zip(params, grads[L:])}
        param = torch.tensor([sum(float(by_param[id(p)].double().pow(2).sum()) for p in block.parameters()
                                  if by_param.get(id(p)) is not None) ** 0.5 for block in self.blocks],
                             dtype=torch.float64)
        return ForwardRecord(logits=None, last_hidden=layers[-1].detach(), layer_outputs=[h.detach() for h in layers],
                             head_outputs=None, token_loss=None, target_valid=batch["attention_mask"].bool(),
                             activation_grad_norm=act, param_grad_norm=param)


def diagnose(classifier: MeanPoolClassifier, tokenizer: Any, task: LineTask, *, band_width: float, max_tokens: int,
             batch_size: int, notify: Progress | None = None) -> dict[str, Any]:
    """The inflection analysis of ``classifier`` on every line of ``task`` with the classification loss.

    Returns ``{"band": [layers], "entropy", "act", "param", "drop", "score": (num_layers,) float64}``
    (:meth:`attnlab.analyses.inflection.InflectionAnalysis.summary`).
    """
    from attnlab.analyses.inflection import InflectionAnalysis

    classifier.eval()
    runner = ClassifierRunner(classifier, tokenizer)
    analysis = InflectionAnalysis(band_width=band_width)
    analysis.prepare(runner.facts, runner)
    device = next(classifier.parameters()).device
    for start in range(0, len(task.texts), batch_size):
        batch = _encode(tokenizer, task.texts[start : start + batch_size], max_tokens, device)
        batch["labels"] = torch.tensor(task.labels[start : start + batch_size], dtype=torch.long, device=device)
        analysis.observe(runner, batch)
        if notify is not None:
            notify(len(batch["labels"]), 0, "diagnosing")
    return analysis.summary()


# LoRA ------------------------------------------------------------------------------------------------------------
def _blocks_name(classifier: MeanPoolClassifier) -> str:
    """The attribute name of the encoder's block list (BERT ``layer``, Llama ``layers``): peft's layers_pattern."""
    from attnlab.capture.architectures import transformer_blocks

    blocks = transformer_blocks(classifier.encoder)
    for name, module in classifier.named_modules():
        if module is blocks:
            return name.rsplit(".", 1)[-1]
    raise ConfigError(f"cannot find the transformer blocks of {type(classifier.encoder).__name__}")


def _targets_per_block(encoder: nn.Module, target_modules: Sequence[str], *, lora_only: bool) -> list[set[str]]:
    """Per transformer block, which of ``target_modules`` name a module in it (peft's rule: the module's name
    inside the block equals the target or ends with ``.target``); with ``lora_only``, only modules peft has
    wrapped (they have a ``lora_A``)."""
    from attnlab.capture.architectures import transformer_blocks

    found = []
    for block in transformer_blocks(encoder):
        names = [name for name, module in block.named_modules()
                 if name and (not lora_only or hasattr(module, "lora_A"))]
        found.append({t for t in target_modules if any(n == t or n.endswith(f".{t}") for n in names)})
    return found


def check_lora_targets(encoder: nn.Module, target_modules: Sequence[str]) -> None:
    """Raise ConfigError unless every block of ``encoder`` has every module in ``target_modules`` (run before any
    training, so a bad ``--lora-target`` fails at once)."""
    found = _targets_per_block(encoder, target_modules, lora_only=False)
    missing = sorted(set(target_modules) - set.intersection(*found)) if found else list(target_modules)
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in encoder.named_modules()
                         if isinstance(module, nn.Linear)})
        raise ConfigError(f"LoRA target modules {missing} not found in every block of "
                          f"{type(encoder).__name__}; linear modules: {', '.join(linear)}")


def add_lora(classifier: MeanPoolClassifier, layers: Sequence[int] | None, *, target_modules: Sequence[str],
             rank: int, alpha: float) -> nn.Module:
    """Freeze the encoder; wrap ``target_modules`` of the blocks ``layers`` (None = every block, [] = none) in
    LoRA adapters (peft ``inject_adapter_in_model`` with ``LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0,
    target_modules=..., layers_to_transform=layers, layers_pattern=<the block list's name>)``); the head stays
    trainable. Returns the classifier (changed in place).

    After injection the placement is read back (the blocks whose modules carry ``lora_A``), since it rests on
    peft's ``layers_pattern`` matching (older peft needs a ``.`` before the pattern and places nothing on a bare
    Llama base model).

    Raises ConfigError when ``target_modules`` names no module in the chosen blocks, or when the adapters did not
    land on exactly the chosen blocks, each with every target.
    """
    for parameter in classifier.encoder.parameters():
        parameter.requires_grad_(False)
    for parameter in classifier.head.parameters():
        parameter.requires_grad_(True)
    if layers is not None and not layers:
        return classifier
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules),
                        layers_to_transform=None if layers is None else sorted(int(i) for i in layers),
                        layers_pattern=None if layers is None else _blocks_name(classifier), bias="none")
    try:
        inject_adapter_in_model(config, classifier.encoder)
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in classifier.encoder.named_modules()
                         if isinstance(module, nn.Linear)})
        raise ConfigError(f"LoRA target modules {list(target_modules)} not found in layers "
                          f"{'all' if layers is None else list(layers)}; linear modules: {', '.join(linear)} "
                          f"({str(error).splitlines()[0][:120]})") from None
    placed = _targets_per_block(classifier.encoder, target_modules, lora_only=True)
    wanted = set(range(len(placed))) if layers is None else {int(i) for i in layers}
    landed = {i: sorted(t) for i, t in enumerate(placed) if t}
    if landed != {i: sorted(set(target_modules)) for i in wanted}:
        raise ConfigError(f"LoRA adapters landed on {landed or 'no block'}, expected {sorted(target_modules)} in "
                          f"blocks {sorted(wanted)} (peft layers_pattern {config.layers_pattern!r}; try a newer peft)")
    for name, parameter in classifier.named_parameters():
        parameter.requires_grad_(name.startswith("head.") or "lora_" in name)
    return classifier


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# the run ---------------------------------------------------------------------------------------------------------
def run_inflection_lora(config: InflectionLoraConfig, *, progress: ProgressArg = None, model: Any = None,
                        tokenizer: Any = None) -> dict[str, Any]:
    """Source fine-tuning (UNDER, OVER) → diagnosis → target adaptation per placement; the results dict.

    ``model``/``tokenizer`` (or a LoadedModel as ``model``) reuse a loaded encoder (copied, never changed).
    ``progress``: None, True (stderr) or a callable ``(done, total, message)`` (:mod:`attnlab.progress`).

    Raises:
        ConfigError: unknown plays, too few lines, LoRA targets the model lacks (the CLI exits 2).
    """
    with progress_to(progress) as notify:
        return _run(config, notify, model, tokenizer)


def _run(config: InflectionLoraConfig, notify: Progress, model: Any, tokenizer: Any) -> dict[str, Any]:
    from attnlab.config import TextSpec
    from attnlab.pipeline import results_envelope, start_run

    started = time.perf_counter()
    spec = config.protocol
    source_train, source_test = build_tasks(spec.source_plays, train_per_play=spec.train_lines,
                                            test_per_play=spec.test_lines, min_words=spec.min_words, seed=spec.seed,
                                            text_dir=spec.text_dir, lines_per_item=spec.lines_per_item)
    target_train, target_test = build_tasks(spec.target_plays, train_per_play=spec.target_train_lines,
                                            test_per_play=spec.test_lines, min_words=spec.min_words,
                                            seed=spec.seed + 1, text_dir=spec.text_dir,
                                            lines_per_item=spec.lines_per_item)
    loaded = start_run(config.load, TextSpec(seq_len=2), spec.seed, notify, model, tokenizer)
    base, tokenizer = loaded
    base = getattr(base, "base_model", base)
    check_lora_targets(base, spec.lora_target)  # before any training (review 15c #5)
    n_diagnose = min(spec.diagnose_lines, len(source_train.texts))  # the training lines are shuffled across plays
    diagnose_task = LineTask(source_train.texts[:n_diagnose], source_train.labels[:n_diagnose], source_train.classes)
    total = (spec.under_steps + spec.over_steps + len(REGIMES) * (len(diagnose_task.texts)
                                                                  + len(PLACEMENTS) * spec.target_steps))
    done = [0]

    def step(count: int, _: int, message: str) -> None:
        done[0] += count
        notify(done[0], total, message)

    shared = {"batch_size": spec.batch_size, "max_tokens": spec.max_tokens}
    table: list[dict[str, Any]] = []
    diagnosis: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for regime in REGIMES:
        steps = spec.under_steps if regime == "under" else spec.over_steps
        torch.manual_seed(spec.seed)
        source = MeanPoolClassifier(copy.deepcopy(base), len(spec.source_plays))
        losses = fit(source, tokenizer, source_train, steps=steps, lr=spec.source_lr, seed=spec.seed, notify=step,
                     message=f"{regime}: source fine-tuning", **shared)
        source_eval = evaluate(source, tokenizer, source_test, **shared)
        summary = diagnose(source, tokenizer, diagnose_task, band_width=spec.band_width, notify=step, **shared)
        band = list(summary["band"])
        diagnosis[regime] = {"band": band, "source_steps": steps, "source_final_loss": losses[-1] if losses else None,
                             "source_accuracy": source_eval["accuracy"],
                             **{key: [_finite(v) for v in summary[key].tolist()]
                                for key in ("entropy", "act", "param", "drop", "score")}}
        rows += _diagnosis_rows(regime, summary, source_eval)
        for placement in PLACEMENTS:
            layers = band if placement == "inflection" else None if placement == "all" else []
            torch.manual_seed(spec.seed + 2)  # the same head (and LoRA) initialisation for every placement
            target = MeanPoolClassifier(copy.deepcopy(source.encoder), len(spec.target_plays))
            add_lora(target, layers, target_modules=spec.lora_target, rank=spec.lora_rank, alpha=spec.lora_alpha)
            params = trainable_parameters(target)
            fit(target, tokenizer, target_train, steps=spec.target_steps, lr=spec.target_lr, seed=spec.seed + 3,
                notify=step, message=f"{regime}: target, LoRA {placement}", **shared)
            result = evaluate(target, tokenizer, target_test, **shared)
            shown = "all" if layers is None else layers or ("no band: head only" if placement == "inflection" else [])
            record = {"regime": regime, "placement": placement, "layers": shown, "trainable_params": params,
                      "target_accuracy": result["accuracy"],
                      "target_accuracy_low": result["accuracy_low"], "target_accuracy_high": result["accuracy_high"],
                      "target_loss": result["loss"], "n": result["n"]}
            table.append(record)
            variant = f"{regime}/{placement}"
            rows += [_row(variant, key, record[key]) for key in ("target_accuracy", "target_accuracy_low",
                                                                   "target_accuracy_high", "target_loss",
                                                                   "trainable_params")]
    extras = {PROBE: {"table": table, "diagnosis": diagnosis, "source_plays": list(spec.source_plays),
                      "target_plays": list(spec.target_plays), "chance": 1 / len(spec.target_plays),
                      "num_layers": loaded.facts.num_layers, "definitions": DEFINITIONS,
                      "band": {regime: ", ".join(map(str, d["band"])) or "none" for regime, d in diagnosis.items()},
                      "source_accuracy": {regime: round(d["source_accuracy"], 3) for regime, d in diagnosis.items()}}}
    return results_envelope(
        "protocol inflection-lora", config, loaded, bos_policy="the tokenizer's special tokens", bos_added=False,
        attention_paths={}, windows=[], rows=rows, started=started, extras=extras,
        sections={PROBE: [_section().to_dict()]})


DEFINITIONS = {
    "target_accuracy": "fraction of target test lines whose play is predicted (argmax); _low/_high: Wilson 95 %",
    "trainable_params": "parameters updated during adaptation: the head plus the LoRA matrices",
    "band": "inflection band of the source model (attnlab.analyses.inflection, classification loss)",
    "source_accuracy": "source model's accuracy on the source test lines after source fine-tuning",
}


def _finite(value: float) -> float | None:
    return None if value != value else float(value)


def _row(variant: str, statistic: str, value: float, layer: int | None = None) -> dict[str, Any]:
    return {"probe": PROBE, "variant": variant, "statistic": statistic, "layer": layer, "head": None,
            "position": None, "value": float(value)}


def _diagnosis_rows(regime: str, summary: dict[str, Any], source_eval: dict[str, float]) -> list[dict[str, Any]]:
    rows = [_row(regime, "source_accuracy", source_eval["accuracy"]), _row(regime, "source_loss", source_eval["loss"])]
    for statistic, key in (("attention_entropy", "entropy"), ("activation_grad_norm", "act"),
                           ("param_grad_norm", "param"), ("gradient_drop", "drop"), ("inflection_score", "score")):
        rows += [_row(regime, statistic, value, layer) for layer, value in enumerate(summary[key].tolist())
                 if value == value]
    rows += [_row(regime, "inflection_band", float(layer in summary["band"]), layer)
             for layer in range(len(summary["entropy"]))]
    return rows


def _section() -> Any:
    from attnlab.report.sections import Column, Section, Table, Text

    columns = (Column("regime", "source regime", format="text"), Column("placement", "LoRA at", format="text"),
               Column("layers", "layers", format="text"), Column("trainable_params", "trainable params"),
               Column("target_accuracy", "target accuracy"), Column("target_accuracy_low", "95 % low"),
               Column("target_accuracy_high", "95 % high"), Column("target_loss", "target loss (nats)"))
    return Section("inflection-lora", "Inflection-layer LoRA", (
        Text(template="Source plays {source_plays}, target plays {target_plays} (chance {chance}). Inflection "
                      "band of the source model: {band}; source test accuracy: {source_accuracy}."),
        Table(columns, extras="table", title="Target accuracy by source regime and LoRA placement",
              caption="inflection: LoRA only at the diagnosed band (the head alone when no band is found); all: "
                      "at every layer; none: the head alone."),
    ))
