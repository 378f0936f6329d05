"""Activation patching and path patching of attention heads, on any model attnlab's backend runs.

Both run the *clean* prompt and move head outputs (before the output projection, METHODS.md notation o^{l,h})
from the *corrupted* prompt into it through the ``head_patch`` edit (:class:`attnlab.edits.head_patch.HeadPatch`),
and score the result with the normalised logit difference of :mod:`attnlab.circuits.pairs`
(1 = clean, 0 = corrupted).

- **Activation patching** (:func:`activation_patching`): one head (and, if asked, one position) at a time takes its
  corrupted output; everything downstream recomputes. This is TransformerLens's
  ``get_act_patch_attn_head_out_all_pos`` / ``..._by_pos`` with the roles of the runs named as here.
- **Path patching** (:func:`path_patching`; Wang et al. 2022 §3, as Merullo et al. 2024 use it, METHODS.md #18):
  the effect of a sender head on the logits, or on receiver heads, only along the direct paths. Sender → logits:
  the sender takes its corrupted output, every head of a later layer is frozen at its clean output, and the MLPs
  and norms recompute (one pass). Sender → receivers: (1) the same pass, keeping what each receiver computes
  before the freeze overwrites it (it sees the sender's change through its query, key and value inputs at once,
  and through the MLPs in between; earlier receivers are frozen like every other head); (2) the clean run with
  only the receivers' outputs replaced by those, everything after them recomputing. With ``receiver_inputs``
  a part of q/k/v (Wang et al. patch name movers' queries, S-inhibition heads' keys and values), step (1) reads
  and step (2) writes only those columns of the receivers' input projections (:mod:`.projections`).

Cost and memory, per batch of B pairs (S = its longest context): 2 baseline forwards (clean and corrupted, each
keeping every head's output and the logit difference in the same pass), then activation patching 1 forward per
head (· S positions with ``per_position``), path patching to the logits 1 per sender, to receivers 2 per sender.
Every forward computes logits at the rows' last real tokens only (``logits_to_keep``: at most B · vocab floats,
where the model takes it) and keeps no hidden states. Kept across a batch's passes: the clean and corrupted head
outputs of every layer, 2 · num_layers · B · num_heads · S · head_dim values in the model's dtype (plus, for
receivers, their outputs or q/k/v columns of one pass); nothing is kept across batches but the score sums,
(num_layers, num_heads[, S]) float64. On top comes one forward's own working memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnlab.capture.architectures import model_facts
from attnlab.capture.session import Session
from attnlab.circuits.pairs import PairBatch, batch_logit_diff, choice_logits
from attnlab.circuits.projections import COMPONENTS, check_components, projection_hooks
from attnlab.edits.base import AttentionCall, Edit
from attnlab.edits.head_patch import HeadOutputs, HeadPatch
from attnlab.errors import ConfigError
from attnlab.facts import ModelFacts
from attnlab.progress import Progress, ProgressArg, takes_progress

Head = tuple[int, int]  # (layer, head)


@dataclass
class PatchingResult:
    """Normalised logit differences after patching each head.

    Attributes:
        kind: ``"activation"`` or ``"path"``. receivers: ``"logits"`` or the receiver heads (path patching;
            ``"logits"`` for activation patching, whose effect reaches the logits along every path).
        scores: (num_layers, num_heads) float64, or (num_layers, num_heads, S) with ``per_position`` — the
            normalised logit difference with that head (at that position) patched: 1 = clean, 0 = corrupted.
            NaN where not measured (a head outside ``heads``/``senders``, a position no pair has). A sender with
            no path to any receiver (layer >= every receiver's) scores exactly 1 without a pass.
        clean_logit_diff, corrupted_logit_diff: mean logit differences of the two unpatched runs.
        num_pairs: pairs scored.
    """

    kind: str
    receivers: Any
    scores: Tensor
    clean_logit_diff: float
    corrupted_logit_diff: float
    num_pairs: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def effects(self) -> Tensor:
        """scores - 1: how far patching the head moves the logit difference, as a fraction of clean - corrupted
        (negative = the head carries the clean answer)."""
        return self.scores - 1.0

    def head_effects(self) -> Tensor:
        """(num_layers, num_heads) effects; per-position scores are summed over positions first (NaN-safe)."""
        if self.scores.dim() == 2:
            return self.effects
        return torch.nansum(self.effects, dim=2).where(~torch.isnan(self.effects).all(dim=2), torch.nan)

    def top(self, count: int) -> list[Head]:
        """The ``count`` heads with the largest |effect| (ties: lower layer, then lower head first)."""
        effects = self.head_effects()
        order = sorted(((layer, head) for layer in range(effects.shape[0]) for head in range(effects.shape[1])
                        if not torch.isnan(effects[layer, head])),
                       key=lambda lh: (-abs(float(effects[lh])), lh))
        return order[:count]

    def rows(self) -> list[dict[str, Any]]:
        """Long-format rows (layer, head[, position], score, effect) for a CSV; unmeasured entries left out."""
        out = []
        for index in torch.nonzero(~torch.isnan(self.scores)).tolist():
            score = float(self.scores[tuple(index)])
            row = {"kind": self.kind, "layer": index[0], "head": index[1]}
            if len(index) == 3:
                row["position"] = index[2]
            out.append({**row, "score": score, "effect": score - 1.0})
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``scores`` (num_layers, num_heads) normalised logit differences (null = not measured); for
        per-position results ``summed_effect`` instead, each head's effects summed over positions (not a
        normalised logit difference: per-position scores are kept only in :meth:`rows`)."""
        receivers = self.receivers if isinstance(self.receivers, str) else [list(r) for r in self.receivers]
        per_position = self.scores.dim() == 3
        values = self.head_effects() if per_position else self.scores
        return {"kind": self.kind, "receivers": receivers, "num_pairs": self.num_pairs,
                "clean_logit_diff": self.clean_logit_diff, "corrupted_logit_diff": self.corrupted_logit_diff,
                "summed_effect" if per_position else "scores": [[None if x != x else x for x in row]
                                                                 for row in values.tolist()],
                **self.meta}


@dataclass
class _Baseline:
    """One batch's unpatched runs: head outputs of every layer and the logit differences."""

    clean: HeadOutputs
    corrupted: HeadOutputs
    clean_ld: Tensor
    corrupted_ld: Tensor


def _baseline(model: Any, batch: PairBatch) -> _Baseline:
    """Two forwards (clean, corrupted), each keeping every head's output and the logit differences at once."""
    clean, clean_ld = _recorded(model, batch, "clean")
    corrupted, corrupted_ld = _recorded(model, batch, "corrupted")
    return _Baseline(clean=clean, corrupted=corrupted, clean_ld=clean_ld, corrupted_ld=corrupted_ld)


def _recorded(model: Any, batch: PairBatch, which: str) -> tuple[HeadOutputs, Tensor]:
    """One run of ``batch``: every head's output before the output projection (B, num_heads, S, head_dim per
    layer, through the edits machinery like the patched runs) and the (B,) logit differences (logits at the last
    real tokens only)."""
    facts = model_facts(model)
    heads = list(range(facts.num_heads))
    keep = _Receive({layer: heads for layer in range(facts.num_layers)})
    with Session(model, edits=[keep], verify_rows=0):
        ld = batch_logit_diff(model, batch, which)
    return HeadOutputs(outputs=keep.outputs, heads=tuple(heads), valid=batch.valid), ld


def _patched_ld(model: Any, batch: PairBatch, edits: list[Any]) -> Tensor:
    """(B,) logit differences of the clean run under ``edits``."""
    with Session(model, edits=edits, verify_rows=0):
        return batch_logit_diff(model, batch, "clean")


def _heads(facts: ModelFacts, heads: Sequence[Head] | None, name: str) -> list[Head]:
    """Every (layer, head) of the model, or ``heads`` checked against it."""
    if heads is None:
        return [(layer, head) for layer in range(facts.num_layers) for head in range(facts.num_heads)]
    out = []
    for pair in heads:
        try:
            layer, head = (int(x) for x in pair)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be (layer, head) pairs, got {pair!r}") from None
        if not (0 <= layer < facts.num_layers and 0 <= head < facts.num_heads):
            raise ConfigError(f"{name}: ({layer}, {head}) is not a head of the model (layers 0..{facts.num_layers - 1}"
                              f", heads 0..{facts.num_heads - 1})")
        out.append((layer, head))
    if not out:
        raise ConfigError(f"{name}: expected at least one (layer, head) pair, got none")
    return sorted(set(out))


def _normalise(sums: Tensor, clean: float, corrupted: float) -> Tensor:
    if abs(clean - corrupted) < 1e-6:
        raise ConfigError(f"the clean and corrupted runs have the same mean logit difference ({clean:.4g} vs "
                          f"{corrupted:.4g}); the normalised patching metric is undefined")
    return (sums - corrupted) / (clean - corrupted)


def _freeze(clean: HeadOutputs, first: int, stop: int) -> list[HeadPatch]:
    """The edit freezing every head of layers first..stop-1 at its clean output (none if the range is empty)."""
    return [HeadPatch.from_source(clean, layers=list(range(first, stop)))] if first < stop else []


def _check_batches(batches: Sequence[PairBatch]) -> None:
    if not batches:
        raise ConfigError("expected at least one batch of pairs (attnlab.circuits.pairs.pair_batches), got none")


@takes_progress
def activation_patching(model: Any, batches: Sequence[PairBatch], *, heads: Sequence[Head] | None = None,
                        per_position: bool = False, progress: ProgressArg = None) -> PatchingResult:
    """Patch each head's output from the corrupted run into the clean run, one head at a time.

    Args:
        model: a transformers causal LM whose attention attnlab's backend runs (:class:`attnlab.Session`) and whose
            blocks' output projection :func:`attnlab.capture.head_record.record_head_outputs` reads.
        batches: from :func:`attnlab.circuits.pairs.pair_batches` (on the model's device).
        heads: (layer, head) pairs to patch (None = every query head of every layer).
        per_position: patch one (head, position) at a time; every pair must have the same token length (no
            padding), so position t is the same token role in every pair.
        progress: see :mod:`attnlab.progress`.

    Returns:
        :class:`PatchingResult` (``kind="activation"``, ``receivers="logits"``).

    Raises:
        ConfigError: no batches; no heads; a head the model does not have; ``per_position`` with pairs of
            different lengths; clean and corrupted runs with equal mean logit differences.
        UnsupportedModelError: a model attnlab cannot run or read head outputs from.
    """
    _check_batches(batches)
    facts = model_facts(model)
    chosen = _heads(facts, heads, "heads")
    length = max(int(b.clean.shape[1]) for b in batches)
    if per_position:
        lengths = sorted({int(n) for b in batches for n in b.valid.sum(dim=1).tolist()})
        if len(lengths) > 1:
            raise ConfigError(f"per_position patching needs pairs of one token length (positions are compared "
                              f"across pairs), got lengths {lengths}")
    shape = (facts.num_layers, facts.num_heads) + ((length,) if per_position else ())
    sums, counts = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    clean_total = corrupted_total = 0.0
    notify: Progress = progress  # type: ignore[assignment]
    steps = len(batches) * len(chosen) * (length if per_position else 1)
    done = 0
    for batch in batches:
        base = _baseline(model, batch)
        clean_total += float(base.clean_ld.double().sum())
        corrupted_total += float(base.corrupted_ld.double().sum())
        for layer, head in chosen:
            if not per_position:
                edit = HeadPatch.from_source(base.corrupted, layers=[layer], heads=[head])
                sums[layer, head] += float(_patched_ld(model, batch, [edit]).double().sum())
                counts[layer, head] += batch.size
                done += 1
                notify(done, steps, f"activation patching · layer {layer} head {head}")
                continue
            for position in range(int(batch.clean.shape[1])):
                source = _one_position(base, layer, head, position)
                edit = HeadPatch.from_source(source, layers=[layer], heads=[head])
                sums[layer, head, position] += float(_patched_ld(model, batch, [edit]).double().sum())
                counts[layer, head, position] += batch.size
                done += 1
                notify(done, steps, f"activation patching · layer {layer} head {head} position {position}")
    num_pairs = sum(b.size for b in batches)
    clean, corrupted = clean_total / num_pairs, corrupted_total / num_pairs
    scores = _normalise(sums / counts, clean, corrupted)  # 0/0 = NaN where not measured
    return PatchingResult("activation", "logits", scores, clean, corrupted, num_pairs,
                          meta={"per_position": per_position})


def _one_position(base: _Baseline, layer: int, head: int, position: int) -> HeadOutputs:
    """A source for one head of one layer: clean outputs, with ``position`` taken from the corrupted run."""
    mixed = base.clean.outputs[layer][:, [head]].clone()  # (B, 1, S, D)
    mixed[:, :, position] = base.corrupted.outputs[layer][:, [head], position]
    return HeadOutputs(outputs={layer: mixed}, heads=(head,), valid=base.clean.valid)


@takes_progress
def path_patching(model: Any, batches: Sequence[PairBatch], *, receivers: str | Sequence[Head] = "logits",
                  senders: Sequence[Head] | None = None, receiver_inputs: str = "qkv", route: str = "auto",
                  progress: ProgressArg = None) -> PatchingResult:
    """Path patching: each sender head's effect through the direct paths to the logits or to receiver heads.

    The procedure is in the module docstring (Wang et al. 2022 §3; Merullo et al. 2024, METHODS.md #18; the
    exact freezing set of Merullo et al.'s code is not public: low confidence there). Other heads are frozen at
    their clean outputs; MLPs and norms recompute.

    Args:
        model, batches: as :func:`activation_patching`.
        receivers: ``"logits"``, or (layer, head) pairs whose q/k/v inputs (together) receive the sender's change.
        senders: (layer, head) pairs to score (None = every head).
        receiver_inputs: which inputs of the receiver heads take the sender's change: ``"qkv"`` (all three: the
            receivers' outputs are replaced, any model) or a part such as ``"q"``, ``"k"``, ``"v"``, ``"kv"``
            (their columns of the input projections, :mod:`attnlab.circuits.projections`; under GQA k or v only
            with whole kv groups as receivers, :func:`check_whole_kv_groups`). Ignored for ``"logits"``.
        route: ``"auto"`` (``qkv`` replaces the receivers' outputs, a part patches projection columns) or
            ``"projection"`` (projection columns even for ``qkv``: the two routes must agree where whole kv groups
            receive; a check, Llama-style or GPT-2 attention only).
        progress: see :mod:`attnlab.progress`.

    Returns:
        :class:`PatchingResult` (``kind="path"``, ``meta["receiver_inputs"]``). Senders at or after the last
        receiver's layer score 1 (no path).

    Raises:
        ConfigError: no batches; an empty receiver list or a receiver/sender the model does not have; k or v
            inputs of part of a kv group under GQA; equal clean and corrupted mean logit differences.
    """
    _check_batches(batches)
    facts = model_facts(model)
    chosen = _heads(facts, senders, "senders")
    components = check_components(receiver_inputs)
    if route not in ("auto", "projection"):
        raise ConfigError(f"route must be 'auto' or 'projection', got {route!r}")
    to_logits = isinstance(receivers, str)
    if to_logits and receivers != "logits":
        raise ConfigError(f"receivers must be 'logits' or (layer, head) pairs, got {receivers!r}")
    targets = [] if to_logits else _heads(facts, receivers, "receivers")
    if not to_logits and not targets:
        raise ConfigError("receivers: expected at least one (layer, head) pair or 'logits', got none")
    if not to_logits and (route == "projection" or components != COMPONENTS):
        check_whole_kv_groups(facts, targets, components)
    sums = torch.full((facts.num_layers, facts.num_heads), torch.nan, dtype=torch.float64)
    for layer, head in chosen:
        sums[layer, head] = 0.0
    clean_total = corrupted_total = 0.0
    notify: Progress = progress  # type: ignore[assignment]
    done = 0
    for batch in batches:
        base = _baseline(model, batch)
        clean_sum = float(base.clean_ld.double().sum())
        clean_total += clean_sum
        corrupted_total += float(base.corrupted_ld.double().sum())
        for layer, head in chosen:
            sender = HeadPatch.from_source(base.corrupted, layers=[layer], heads=[head])
            if to_logits:
                ld = _patched_ld(model, batch, [sender, *_freeze(base.clean, layer + 1, facts.num_layers)])
                sums[layer, head] += float(ld.double().sum())
            else:
                sums[layer, head] += _to_receivers(model, batch, base, sender, layer, targets, clean_sum,
                                                   components, projection=route == "projection")
            done += 1
            notify(done, len(batches) * len(chosen), f"path patching · sender layer {layer} head {head}")
    num_pairs = sum(b.size for b in batches)
    clean, corrupted = clean_total / num_pairs, corrupted_total / num_pairs
    scores = _normalise(sums / num_pairs, clean, corrupted)
    label = "logits" if to_logits else tuple(targets)
    return PatchingResult("path", label, scores, clean, corrupted, num_pairs,
                          meta={"receiver_inputs": "".join(components)})


def check_whole_kv_groups(facts: ModelFacts, receivers: Sequence[Head], components: Sequence[str]) -> None:
    """Under GQA a receiver's k or v columns are its whole kv group's, which every query head of the group reads:
    patching them would credit the other heads' paths to the named receiver. Refuse that unless every query head
    of each touched group is a receiver.

    Raises:
        ConfigError: k or v among ``components`` and a receiver whose kv group is only partly among ``receivers``.
    """
    if not {"k", "v"} & set(components) or facts.num_kv_heads == facts.num_heads:
        return
    size = facts.num_heads // facts.num_kv_heads
    chosen = set(receivers)
    for layer, head in receivers:
        group = [(layer, h) for h in range(head // size * size, head // size * size + size)]
        if not set(group) <= chosen:
            raise ConfigError(f"receiver_inputs {''.join(components)!r}: under GQA ({size} query heads per kv head) "
                              f"a k or v patch reaches every head of the kv group, but receiver ({layer}, {head}) "
                              f"comes without {sorted(set(group) - chosen)}; use q or qkv, or name the whole group")


class _Receive(Edit):
    """Keeps the selected heads' own outputs of a pass (before a later output edit, the freeze, overwrites them);
    changes nothing. Internal to path patching (not registered)."""

    name = "receive"
    stage = "output"
    fast = True
    # no identity form declared: it changes nothing but must run (the session skips identity edits)
    identity: ClassVar[dict[str, Any] | None] = None

    def __init__(self, heads: dict[int, list[int]]) -> None:
        super().__init__(layers=sorted(heads))
        self.by_layer = heads
        self.outputs: dict[int, Tensor] = {}

    def output_mod(self, output: Tensor, call: AttentionCall) -> Tensor:
        return self.output_mod_at(output, None, call)

    def output_mod_at(self, output: Tensor, q_index: Tensor | None, call: AttentionCall) -> Tensor:
        if q_index is None:  # the whole call (the edit report's sampled rows are not kept)
            self.outputs[call.layer_idx] = output[:, self.by_layer[call.layer_idx]].detach().clone()
        return output


def _to_receivers(model: Any, batch: PairBatch, base: _Baseline, sender: HeadPatch, sender_layer: int,
                  targets: list[Head], clean_sum: float, components: tuple[str, ...] = COMPONENTS,
                  projection: bool = False) -> float:
    """Sum over the batch of the clean run's logit difference with the receivers fed the sender's path."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in targets:
        if layer > sender_layer:
            by_layer.setdefault(layer, []).append(head)
    if not by_layer:
        return clean_sum  # no path from the sender to any receiver: the clean run itself
    num_layers = len(base.clean.outputs)
    frozen = [sender, *_freeze(base.clean, sender_layer + 1, num_layers)]
    if projection or components != COMPONENTS:  # read and write the receivers' input-projection columns
        received: dict[Any, Tensor] = {}
        with projection_hooks(model, by_layer, components, record=received), Session(model, edits=frozen,
                                                                                     verify_rows=0):
            choice_logits(model, batch, "clean")
        with projection_hooks(model, by_layer, components, replace=received):
            return float(batch_logit_diff(model, batch, "clean").double().sum())
    receive = _Receive(by_layer)
    # step 1: sender corrupted, every later head frozen clean; the receivers' own outputs are kept before the freeze
    with Session(model, edits=[frozen[0], receive, *frozen[1:]], verify_rows=0):
        choice_logits(model, batch, "clean")
    # step 2: the clean run with only the receivers' outputs replaced
    patches = [HeadPatch.from_source(HeadOutputs(outputs={layer: receive.outputs[layer]}, heads=tuple(heads),
                                                 valid=base.clean.valid))
               for layer, heads in sorted(by_layer.items())]
    return float(_patched_ld(model, batch, patches).double().sum())
