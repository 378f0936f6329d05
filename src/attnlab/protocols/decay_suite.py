"""The held-out measures of the data-quality protocol: perplexity, passkey, cloze and recall, scored per item.

Every measure is built once from a held-out text (:func:`build_suite`) and scored on each trained model
(:func:`score_suite`), so all conditions see the same items. Each item gives one number per metric, so effect sizes
(:mod:`attnlab.stats.effect_size`) can compare conditions item by item:

- ``perplexity``: windows of ``window_tokens`` consecutive held-out tokens (non-overlapping, HF sliding-window rule
  of :mod:`attnlab.evaluation.lm_tasks`; each window scores its tokens but the first); metric ``nll`` = the
  window's mean NLL (nats per token, lower is better); the run's perplexity is ``exp`` of the mean over windows
  (every window scores the same number of tokens).
- ``passkey``: :mod:`attnlab.evaluation.passkey` prompts with the held-out text as haystack; metric
  ``passkey_accuracy`` = 1 if the greedy answer's first digit run is the key (RULER's needle-in-a-haystack family,
  which "LLMs Can Get Brain Rot!" measures long-context understanding with).
- ``cloze``: :func:`attnlab.evaluation.choice_tasks.cloze_items` on the held-out text, scored by
  :func:`attnlab.evaluation.choice.score_choices`; metrics ``cloze_accuracy`` (arg-max of the unnormalised
  log-likelihoods is the answer) and ``cloze_margin`` (the answer's log-likelihood minus the best distractor's,
  nats).
- ``recall``: in-context recall of a cued span. A passage of ``recall_context`` held-out tokens is followed by the
  tokens of ``"\\n\\n"`` and then ``recall_cue`` tokens copied from a random place inside the passage; the model
  decodes ``recall_target`` tokens greedily, and the item is right when they are the ``recall_target`` tokens that
  follow the cue in the passage (metric ``recall_exact``); ``recall_token_accuracy`` is the fraction of the
  decoded tokens equal to the passage's at the same offset. This is our operationalisation (an induction-style
  copy task in the spirit of RULER's retrieval tasks), not a task of the paper.

Items are drawn from ``random.Random(seed)`` (passkey keys and offsets, cloze positions, recall passages and cues).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnlab.errors import ConfigError
from attnlab.progress import Progress

__all__ = ["METRICS", "Metric", "RecallItem", "Suite", "SuiteSettings", "build_suite", "recall_items", "score_suite",
           "summarise_scores"]

TASKS = ("perplexity", "passkey", "cloze", "recall")


@dataclass(frozen=True)
class Metric:
    """One per-item metric: its task, whether higher is better, and its definition."""

    name: str
    task: str
    higher_is_better: bool
    definition: str


METRICS: tuple[Metric, ...] = (
    Metric("nll", "perplexity", False, "mean NLL (nats/token) of a held-out window; perplexity = exp(mean)"),
    Metric("passkey_accuracy", "passkey", True, "greedy answer's first digit run equals the hidden key"),
    Metric("cloze_accuracy", "cloze", True, "the masked word's log-likelihood is strictly the highest (ties count wrong)"),
    Metric("cloze_margin", "cloze", True, "answer log-likelihood minus the best distractor's (nats)"),
    Metric("recall_exact", "recall", True, "greedy continuation of the cue equals the passage's next tokens"),
    Metric("recall_token_accuracy", "recall", True, "fraction of the decoded tokens equal to the passage's"),
)


@dataclass(frozen=True)
class SuiteSettings:
    """Sizes of the held-out measures (see the module docstring); a count of 0 leaves that task out.

    Attributes:
        windows: perplexity windows; window_tokens: tokens per window.
        passkey_lengths: prompt lengths (tokens); passkey_depths: needle depths in [0, 1]; passkey_trials: prompts
            per (length, depth) cell.
        cloze_items: cloze items; cloze_context: most tokens of a cloze passage.
        recall_items: recall items; recall_context, recall_cue, recall_target: their token counts.
    """

    windows: int = 8
    window_tokens: int = 256
    passkey_lengths: tuple[int, ...] = (256,)
    passkey_depths: tuple[float, ...] = (0.25, 0.5, 0.75)
    passkey_trials: int = 4
    cloze_items: int = 32
    cloze_context: int = 48
    recall_items: int = 16
    recall_context: int = 128
    recall_cue: int = 8
    recall_target: int = 8

    def tasks(self) -> tuple[str, ...]:
        """The tasks with a non-zero count, in :data:`TASKS` order."""
        counts = {"perplexity": self.windows, "passkey": self.passkey_trials and len(self.passkey_lengths),
                  "cloze": self.cloze_items, "recall": self.recall_items}
        return tuple(task for task in TASKS if counts[task])


@dataclass(frozen=True)
class RecallItem:
    """One recall item (token ids of the held-out text's tokenizer).

    Attributes:
        ids: passage + separator + cue (BOS first when one is used), the prompt fed to greedy decoding.
        target: the tokens that follow the cue in the passage (what recall must reproduce).
        cue_start: where the cue starts in the passage (a token index into the passage).
        offset: where the passage starts in the held-out text's tokens (``Suite.ids[offset:offset + context]``).
    """

    ids: list[int]
    target: list[int]
    cue_start: int
    offset: int


@dataclass
class Suite:
    """The built items of every task (empty lists for tasks left out); ``ids`` are the held-out text's tokens."""

    settings: SuiteSettings
    ids: list[int]
    bos_id: int | None
    plans: list[Any] = field(default_factory=list)
    prompts: list[Any] = field(default_factory=list)
    cloze: list[Any] = field(default_factory=list)
    recall: list[RecallItem] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"perplexity": len(self.plans), "passkey": len(self.prompts), "cloze": len(self.cloze),
                "recall": len(self.recall)}


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def recall_items(tokenizer: Any, ids: list[int], *, count: int, context: int, cue: int, target: int, seed: int,
                 bos_id: int | None = None) -> list[RecallItem]:
    """``count`` recall items from the token stream ``ids`` (see the module docstring).

    Passage offsets are drawn uniformly from ``0 … len(ids) − context`` and the cue start uniformly from
    ``0 … context − cue − target``, both from ``random.Random(seed)``. Raises ConfigError when
    ``cue + target > context`` or ``ids`` is shorter than ``context``.
    """
    if min(count, context, cue, target) < 1 or cue + target > context:
        raise ConfigError(f"recall needs count, context, cue, target >= 1 and cue + target <= context, got "
                          f"count={count}, context={context}, cue={cue}, target={target}")
    if len(ids) < context:
        raise ConfigError(f"recall passages need {context} held-out tokens, but the text has {len(ids)}")
    separator = _encode(tokenizer, "\n\n")
    rng = random.Random(seed)
    items = []
    for _ in range(count):
        offset = rng.randint(0, len(ids) - context)
        passage = ids[offset:offset + context]
        start = rng.randint(0, context - cue - target)
        prompt = ([bos_id] if bos_id is not None else []) + passage + separator + passage[start:start + cue]
        items.append(RecallItem(prompt, passage[start + cue:start + cue + target], start, offset))
    return items


def build_suite(tokenizer: Any, heldout: str | Path, settings: SuiteSettings, *, bos_id: int | None,
                seed: int = 0) -> Suite:
    """Build every task's items from the held-out text file ``heldout`` (a path: the cloze generator reads files);
    ``seed`` draws every item.

    Raises ConfigError (one line) when the text is too short for the asked sizes.
    """
    from attnlab.evaluation.lm_tasks import plan_windows
    from attnlab.evaluation.passkey import make_prompts
    from attnlab.text import read_text_file

    text = read_text_file(heldout)
    longest = max((*settings.passkey_lengths, settings.recall_context, settings.window_tokens * settings.windows))
    ids = _encode(tokenizer, text[:max(64 * longest, 1 << 16)])  # enough characters for the tokens needed
    if len(ids) < longest:
        ids = _encode(tokenizer, text)
    suite = Suite(settings, ids, bos_id)
    tasks = settings.tasks()
    window = settings.window_tokens - (bos_id is not None)
    if "perplexity" in tasks:
        if len(ids) < window * settings.windows:
            raise ConfigError(f"{settings.windows} held-out windows of {window} tokens need {window * settings.windows}"
                              f" tokens, but the held-out text has {len(ids)}")
        suite.plans = plan_windows(len(ids), window, window, settings.windows)
    if "passkey" in tasks:
        suite.prompts = make_prompts(tokenizer, ids, lengths=settings.passkey_lengths, depths=settings.passkey_depths,
                                     trials=settings.passkey_trials, seed=seed, bos_id=bos_id)
    if "cloze" in tasks:
        from attnlab.evaluation.choice_tasks import cloze_items

        suite.cloze = cloze_items(tokenizer, text=heldout, count=settings.cloze_items, seed=seed,
                                  context_tokens=settings.cloze_context)
    if "recall" in tasks:
        suite.recall = recall_items(tokenizer, ids, count=settings.recall_items, context=settings.recall_context,
                                    cue=settings.recall_cue, target=settings.recall_target, seed=seed,
                                    bos_id=bos_id)
    return suite


def score_suite(model: Any, tokenizer: Any, suite: Suite, *, device: Any = "cpu", notify: Progress | None = None,
                label: str = "") -> dict[str, list[float]]:
    """Score every item of ``suite`` with ``model`` (eval mode, no gradients; the model's mode is restored).

    Returns:
        ``{metric name: per-item values}`` for the tasks the suite holds (:data:`METRICS`), each list in the suite's
        item order (windows, prompts, cloze items, recall items): ``nll`` = mean NLL of a window (nats/token);
        ``cloze_margin`` = answer loglik minus the best distractor's (nats); ``passkey_accuracy``,
        ``cloze_accuracy``, ``recall_exact`` = 0.0 or 1.0 per item; ``recall_token_accuracy`` = a fraction in
        [0, 1] per item.

    ``notify(0, 0, message)`` names each task as it starts (the caller counts conditions).
    """
    import torch

    from attnlab.evaluation.lm_tasks import score_windows
    from attnlab.evaluation.passkey import answer_tokens, greedy_decode, is_correct

    def say(task: str) -> None:
        if notify is not None:
            notify(0, 0, f"{label}: {task}")

    was_training = model.training
    model.eval()
    scores: dict[str, list[float]] = {}
    try:
        with torch.no_grad():
            if suite.plans:
                say("perplexity")
                scores["nll"] = []
                for _, stats, _ in score_windows(model, suite.ids, suite.plans, bos_id=suite.bos_id, device=device):
                    scores["nll"].append(float(stats["nll"].mean()))
                    say(f"perplexity window {len(scores['nll'])}/{len(suite.plans)}")
            if suite.prompts:
                say("passkey")
                scores["passkey_accuracy"] = []
                for number, prompt in enumerate(suite.prompts, start=1):
                    say(f"passkey trial {number}/{len(suite.prompts)}")
                    answer = tokenizer.decode(greedy_decode(model, prompt.ids, answer_tokens(tokenizer, prompt.key),
                                                            device))
                    scores["passkey_accuracy"].append(float(is_correct(answer, prompt.key)))
            if suite.recall:
                say("recall")
                exact, tokens = [], []
                for number, item in enumerate(suite.recall, start=1):
                    say(f"recall item {number}/{len(suite.recall)}")
                    new = greedy_decode(model, item.ids, len(item.target), device)
                    hits = [a == b for a, b in zip(new, item.target)]
                    exact.append(float(all(hits)))
                    tokens.append(sum(hits) / len(item.target))
                scores["recall_exact"], scores["recall_token_accuracy"] = exact, tokens
        if suite.cloze:
            from attnlab.evaluation.choice import score_choices

            say("cloze")
            bos = "never" if suite.bos_id is None else "always"
            result = score_choices(model, tokenizer, suite.cloze, bos=bos, device=device)
            scores["cloze_accuracy"] = [float(hit) for hit in result.correct("none")]
            scores["cloze_margin"] = [float(m) for m in result.margins()]
    finally:
        model.train(was_training)
    return scores


def summarise_scores(scores: dict[str, list[float]]) -> dict[str, float]:
    """The run-level numbers of one condition: each metric's mean, plus ``perplexity`` = exp(mean window NLL)."""
    import math

    out = {name: sum(values) / len(values) for name, values in scores.items() if values}
    if "nll" in out:
        out["perplexity"] = math.exp(out["nll"])
    return out
