"""DARE: target attention of candidate items over a long behaviour sequence, with one embedding table shared by
attention and representation (TWIN) or two decoupled tables (DARE).

Source: Feng et al., "Long-Sequence Recommendation Models Need Decoupled Embeddings", ICLR 2025, and the released
code thuml/DARE (``model/base_model_pytorch.py``, ``model/din_pytorch.py``, ``model/attention_pytorch.py``):
items are embedded by item id and category id; the candidate's attention embedding is dot-multiplied with each
behaviour's attention embedding (no projection matrices), the top-k behaviours by that score are kept (the
search), a softmax over their scores weights their *representation* embeddings, and an MLP reads
``[target representation, weighted behaviours, their product]``. TWIN uses one table for both roles; DARE two.

Data (:class:`DareData`):

- Items ``0 … V−1`` (``num_items``) fall into ``K = num_categories`` categories of ``P = V / K`` consecutive ids
  (item i is in category ``i // P``). Each item has a style ±1, in each category exactly half +1: the item table
  (:func:`item_styles`, fixed for a seed and shared by the splits) is
  ``default_rng(SeedSequence([seed, 2])).permuted(tile(base, (K, 1)), axis=1)``, row k = category k, with
  ``base`` = P/2 times +1 then P/2 times −1. ``by_style[k, 0]`` / ``by_style[k, 1]`` list the items of category k
  with style +1 / −1 in increasing id order.
- A batch of B users (``n = interests_per_user``, ``T = seq_len`` behaviours, ``M = num_candidates``) makes
  these calls on its generator ``rng = default_rng(SeedSequence([seed, split, step]))``, in this order:

  1. interests (n distinct categories, uniform): ``argsort(rng.random((B, K)), axis=1)[:, :n]``;
  2. their preferred styles: ``rng.integers(0, 2, size=(B, n)) · 2 − 1``;
  3. interest weights: ``rng.dirichlet(ones(n), size=B)``;
  4. each behaviour's interest: ``u = rng.random((B, T))``; the interest is the number of cumulative weights
     below u (at most n − 1);
  5. its style: ``rng.random((B, T)) < style_fidelity`` keeps the interest's preferred style, else the other;
  6. its item: ``by_style[category, style index, rng.integers(0, P // 2, size=(B, T))]``;
  7. noise: where ``rng.random((B, T)) < noise`` the behaviour is instead ``rng.integers(0, V, size=(B, T))``
     (both arrays are drawn for every position);
  8. candidate categories: where ``rng.random((B, M)) < candidate_from_interest`` the category of interest
     ``rng.integers(0, n, size=(B, M))``, else ``rng.integers(0, K, size=(B, M))`` (all three drawn, in this
     order, for every candidate);
  9. candidate items, either style: ``category · P + rng.integers(0, P, size=(B, M))``.

  The order of behaviours carries nothing.
- Label (10): a candidate c is clicked when it matches an interest strongly represented among the behaviours:
  ``agreement(c) = Σ_j style(b_j)·style(c)`` over the behaviours b_j of c's category must reach ``threshold``. The
  label is a function of the observed sequence (a model that retrieves every same-category behaviour and reads
  their styles can be perfect, AUC 1); the relevant behaviours of c are those of its category.

Model (:class:`DareModel`): the sequence ``[b_1 … b_T, c_1 … c_M]`` (M candidates scored independently), each
token embedded as ``[item embedding (C/2) ‖ category embedding (C/2)]`` twice, for representation and for
attention (``decoupled``: separate tables; ``shared``: the same tables). One attention site, the ``decoupled``
layer with ``projections="none"`` (so head h compares and averages slice h: the first half of the heads read item
dims, the rest category dims), ``top_k`` search and the per-call keep of :func:`~attnlab.layers.decoupled.target_mask`
(a candidate sees every behaviour and nothing else; a behaviour sees only itself). The prediction MLP reads
``[r(c), u(c), r(c) ⊙ u(c)]`` (r the representation embedding, u the attention output at c's position) through
3C → 64 → 32 → 1 with PReLU (the paper: 200 → 80 → 2 with batch norm). The loss is binary cross-entropy.

Metrics (per eval batch; the trainer averages ``Σ sum / Σ count`` over eval batches): ``auc`` (of the batch's
M·B candidates, ties ½; each batch holding both classes counts once: :func:`attnlab.lab.apps.metrics.auc_term`),
``logloss``, ``accuracy`` (threshold 0.5), ``positive_rate``; the search stage, read from the layer
(:meth:`DecoupledAttention.search_scores`, :meth:`~DecoupledAttention.attention_probs`) on candidates with at
least one relevant behaviour: ``recall_at_k`` (``|top-k ∩ relevant| / min(k, |relevant|)``, k = ``top_k``, or 16
when ``top_k = 0``), ``relevant_mass`` (attention probability on relevant behaviours, mean over heads) and
``candidate_entropy`` (nats, candidate rows).
The default probes (``sink``, ``entropy``, ``distance``) see all T + M rows of the site, T of them the behaviours'
one-key self rows (docs/apps/dare.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.functional.masks import full, to_dense
from attnlab.lab.apps import APPS
from attnlab.lab.apps.base import App, AppData
from attnlab.lab.apps.host import AppConfig, AppModel
from attnlab.lab.apps.metrics import auc_term
from attnlab.layers.decoupled import PROJECTIONS, DecoupledAttention, target_mask
from attnlab.params import Range, validated

__all__ = ["DareApp", "DareData", "DareModel", "click_labels", "item_styles"]

RECALL_K_WITHOUT_SEARCH = 16


def item_styles(num_items: int, num_categories: int, seed: int) -> np.ndarray:
    """(num_items,) int64 of ±1: per category (consecutive ids), exactly half the items have style +1, placed by
    ``default_rng(SeedSequence([seed, 2]))``."""
    per = num_items // num_categories
    base = np.repeat(np.array([1, -1], dtype=np.int64), per // 2)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    return rng.permuted(np.tile(base, (num_categories, 1)), axis=1).reshape(-1)


def click_labels(behaviours: np.ndarray, candidates: np.ndarray, styles: np.ndarray, per_category: int,
                 threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step (10) of the module docstring.

    Args:
        behaviours: (B, T) item ids; candidates: (B, M) item ids; styles: (V,) ±1; per_category: P.
        threshold: the agreement a click needs.

    Returns: labels (B, M) float32 (1 = clicked), relevant (B, M, T) bool (behaviour j is in candidate m's
    category), agreement (B, M) int64.
    """
    relevant = (behaviours // per_category)[:, None, :] == (candidates // per_category)[:, :, None]
    agreement = (relevant * styles[behaviours][:, None, :] * styles[candidates][:, :, None]).sum(-1)
    return (agreement >= threshold).astype(np.float32), relevant, agreement.astype(np.int64)


class DareData(AppData):
    """Users with latent interests, long behaviour sequences and candidates (the module docstring, steps 1–10)."""

    name = "dare"

    @validated
    def __init__(self, num_items: Annotated[int, Range(ge=2, le=1 << 20)] = 512,
                 num_categories: Annotated[int, Range(ge=1, le=1 << 16)] = 32,
                 seq_len: Annotated[int, Range(ge=1, le=4096)] = 128,
                 num_candidates: Annotated[int, Range(ge=1, le=1024)] = 8,
                 interests_per_user: Annotated[int, Range(ge=1, le=1 << 16)] = 6,
                 noise: Annotated[float, Range(ge=0.0, le=1.0)] = 0.3,
                 style_fidelity: Annotated[float, Range(ge=0.0, le=1.0)] = 0.9,
                 candidate_from_interest: Annotated[float, Range(ge=0.0, le=1.0)] = 0.5,
                 threshold: Annotated[int, Range(ge=-4096, le=4096)] = 3,
                 seed: Annotated[int, Range(ge=0)] = 0) -> None:
        """Args: see the module docstring. Raises ConfigError for a value out of range, num_items not a multiple of
        num_categories with an even number (≥ 2) of items per category, or interests_per_user > num_categories."""
        per, rest = divmod(num_items, num_categories)
        if rest or per < 2 or per % 2:
            raise ConfigError(f"dare: expected num_items a multiple of num_categories with an even number (>= 2) of "
                              f"items per category, got num_items={num_items}, num_categories={num_categories}")
        if interests_per_user > num_categories:
            raise ConfigError(f"dare: expected interests_per_user <= num_categories={num_categories}, got "
                              f"{interests_per_user}")
        self.num_items, self.num_categories, self.seq_len = num_items, num_categories, seq_len
        self.num_candidates, self.interests_per_user, self.noise = num_candidates, interests_per_user, noise
        self.style_fidelity, self.candidate_from_interest = style_fidelity, candidate_from_interest
        self.threshold, self.seed = threshold, seed
        self.per_category = per
        self.styles = item_styles(num_items, num_categories, seed)
        # items of (category, style index 0 = +1 / 1 = −1): (K, 2, P/2)
        ids = np.arange(num_items).reshape(num_categories, per)
        plus = self.styles.reshape(num_categories, per) == 1
        self.by_style = np.stack([np.stack([row[mask], row[~mask]]) for row, mask in zip(ids, plus)])

    def sample(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        B, T, M, n = batch_size, self.seq_len, self.num_candidates, self.interests_per_user
        K, V, P = self.num_categories, self.num_items, self.per_category
        interests = np.argsort(rng.random((B, K)), axis=1)[:, :n]                         # (1) (B, n)
        preferred = rng.integers(0, 2, size=(B, n)) * 2 - 1                                 # (2) ±1
        weights = rng.dirichlet(np.ones(n), size=B)                                         # (3) (B, n)
        which = (rng.random((B, T))[..., None] > np.cumsum(weights, axis=1)[:, None, :]).sum(-1)  # (4)
        which = np.minimum(which, n - 1)
        category = np.take_along_axis(interests, which, axis=1)
        faithful = rng.random((B, T)) < self.style_fidelity                                 # (5)
        style = np.where(faithful, 1, -1) * np.take_along_axis(preferred, which, axis=1)
        behaviours = self.by_style[category, (style == -1).astype(np.int64),
                                   rng.integers(0, P // 2, size=(B, T))]                    # (6)
        noisy = rng.random((B, T)) < self.noise                                             # (7)
        behaviours = np.where(noisy, rng.integers(0, V, size=(B, T)), behaviours)
        from_interest = rng.random((B, M)) < self.candidate_from_interest                  # (8)
        own = np.take_along_axis(interests, rng.integers(0, n, size=(B, M)), axis=1)
        candidate_category = np.where(from_interest, own, rng.integers(0, K, size=(B, M)))
        candidates = candidate_category * P + rng.integers(0, P, size=(B, M))               # (9)
        labels, relevant, agreement = click_labels(behaviours, candidates, self.styles, P, self.threshold)  # (10)
        return {"behaviours": behaviours, "behaviour_categories": behaviours // P, "candidates": candidates,
                "candidate_categories": candidate_category, "labels": labels, "relevant": relevant,
                "agreement": agreement}


class DareModel(AppModel):
    """Embeddings (decoupled or shared), one ``decoupled`` target-attention site with search, the prediction MLP."""

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config)
        args, C = config.model_args, config.hidden_size
        self.num_items, self.num_categories = args["num_items"], args["num_categories"]
        item_width = C // 2
        self.item_representation = nn.Embedding(self.num_items, item_width)
        self.category_representation = nn.Embedding(self.num_categories, C - item_width)
        layer = DecoupledAttention(C, config.num_attention_heads, projections=args["projections"],
                                   top_k=args["top_k"] or None, mask_mod=full(), rope_base=None)
        self.target_attention = self.site(layer)
        self.predict = nn.Sequential(nn.Linear(3 * C, 64), nn.PReLU(init=0.1), nn.Linear(64, 32),
                                     nn.PReLU(init=0.1), nn.Linear(32, 1))
        # last, so that both variants draw every other initial weight identically from the same seed
        decoupled = config.variant == "decoupled"
        self.item_attention = nn.Embedding(self.num_items, item_width) if decoupled else None
        self.category_attention = nn.Embedding(self.num_categories, C - item_width) if decoupled else None
        self.finish_sites()

    def encode(self, behaviours: Tensor, behaviour_categories: Tensor, candidates: Tensor,
               candidate_categories: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The site's inputs: representation (B, T+M, C), attention (B, T+M, C) embeddings and keep (1, 1, T+M,
        T+M) bool (the target layout). Raises ConfigError for an item or category id the tables do not hold."""
        items = torch.cat([behaviours, candidates], dim=1)  # (B, L), L = T + M
        categories = torch.cat([behaviour_categories, candidate_categories], dim=1)
        for name, ids, size in (("item", items, self.num_items), ("category", categories, self.num_categories)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
                raise ConfigError(f"dare: the model holds {size} {name} ids (--model-arg num_{name}s) but the batch "
                                  f"has ids in [{int(ids.min())}, {int(ids.max())}]")
        representation = torch.cat([self.item_representation(items), self.category_representation(categories)], -1)
        item_table = self.item_attention or self.item_representation  # shared: the same tables
        category_table = self.category_attention or self.category_representation
        attention = torch.cat([item_table(items), category_table(categories)], -1)
        length = items.shape[1]
        keep = to_dense(target_mask(behaviours.shape[1]), 1, 1, length, length, device=items.device)
        return representation, attention, keep

    def forward(self, behaviours: Tensor, behaviour_categories: Tensor, candidates: Tensor,
                candidate_categories: Tensor) -> Tensor:
        """behaviours, behaviour_categories (B, T) int64; candidates, candidate_categories (B, M) int64.
        Returns click logits (B, M)."""
        representation, attention, keep = self.encode(behaviours, behaviour_categories, candidates,
                                                      candidate_categories)
        mixed = self.target_attention(representation, attention_states=attention, keep=keep)
        T = behaviours.shape[1]
        target, interest = representation[:, T:], mixed[:, T:]  # (B, M, C)
        return self.predict(torch.cat([target, interest, target * interest], dim=-1)).squeeze(-1)


_INPUTS = ("behaviours", "behaviour_categories", "candidates", "candidate_categories")


@APPS.register("dare")
class DareApp(App):
    """DARE's decoupled attention and representation embeddings for long-sequence CTR (Feng et al., ICLR 2025).

    Model arguments: ``top_k`` (16; 0 = no search), ``projections`` ("none" or "linear"), ``num_items`` and
    ``num_categories`` (512 and 32; shared with the generator: a value given on either side sets both)."""

    layer = "decoupled"
    data_class = DareData
    model_class = DareModel
    variants = {
        "decoupled": "two embedding tables: attention (search and weights) and representation (values, features)",
        "shared": "one embedding table for attention and representation (TWIN)",
    }
    headline = "auc"
    higher_is_better = True
    defaults = {"steps": 900, "lr": 1e-2, "batch_size": 64, "eval_every": 150, "eval_batches": 4}
    model_defaults = {"top_k": 16, "projections": "none", "num_items": 512, "num_categories": 32}
    model_hints = {"top_k": Annotated[int, Range(ge=0, le=4096)],  # 0 = no search
                   "projections": Literal[PROJECTIONS],
                   "num_items": Annotated[int, Range(ge=2, le=1 << 20)],  # num_items, num_categories: as the data's
                   "num_categories": Annotated[int, Range(ge=1, le=1 << 16)]}
    shared_args = ("num_items", "num_categories")

    def __init__(self, variant: str | None = None, **kwargs: Any) -> None:
        super().__init__(variant, **kwargs)
        if self.hidden_size < 2:
            raise ConfigError(f"app dare: expected hidden_size >= 2 (item and category halves), got {self.hidden_size}")

    # summary_sites: all (the one site). Its 136 query rows are 128 self-only behaviour rows and 8 candidate rows,
    # so the compare table's entropy (≈ 0.15) and sink_rate (≈ 0.9) describe that layout; choosing sites cannot
    # separate rows: the candidate-row statistics are the metrics candidate_entropy and relevant_mass.

    def loss(self, model: DareModel, batch: Mapping[str, Tensor]) -> Tensor:
        logits = model(*(batch[key] for key in _INPUTS))
        return F.binary_cross_entropy_with_logits(logits, batch["labels"])

    def metrics(self, model: DareModel, batch: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
        logits, labels = model(*(batch[key] for key in _INPUTS)), batch["labels"]
        n = labels.numel()
        out = {"auc": auc_term(logits, labels),
               "logloss": (float(F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")), n),
               "accuracy": (float(((logits > 0) == (labels > 0.5)).sum()), n),
               "positive_rate": (float(labels.sum()), n)}
        return {**out, **self.search_metrics(model, batch)}

    def search_metrics(self, model: DareModel, batch: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
        """``recall_at_k``, ``relevant_mass``, ``candidate_entropy`` over candidates with a relevant behaviour."""
        representation, attention, keep = model.encode(*(batch[key] for key in _INPUTS))
        layer: DecoupledAttention = model.target_attention.layer
        T = batch["behaviours"].shape[1]
        relevant = batch["relevant"]  # (B, M, T)
        counted = relevant.any(-1)  # (B, M)
        rows = int(counted.sum())
        if rows == 0:
            return {"recall_at_k": (0.0, 0.0), "relevant_mass": (0.0, 0.0), "candidate_entropy": (0.0, 0.0)}
        k = min(self.model_args["top_k"] or RECALL_K_WITHOUT_SEARCH, T)
        scores = layer.search_scores(representation, attention_states=attention, keep=keep)[:, T:, :T]
        hits = relevant.gather(-1, scores.topk(k, dim=-1).indices).sum(-1).double()
        recall = hits / relevant.sum(-1).clamp(min=1, max=k)
        probs = layer.attention_probs(representation, attention_states=attention, keep=keep)[:, :, T:, :T].double()
        mass = (probs * relevant[:, None]).sum(-1).mean(1)  # (B, M), mean over heads
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(1)
        return {"recall_at_k": (float(recall[counted].sum()), rows),
                "relevant_mass": (float(mass[counted].sum()), rows),
                "candidate_entropy": (float(entropy[counted].sum()), rows)}
