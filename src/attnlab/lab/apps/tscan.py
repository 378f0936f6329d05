"""TSCAN (Yu et al. 2023; METHODS.md #37): does attention that factorises into time nodes × clinical items put
less weight on irrelevant items and time points than plain attention over the same cells, and predict better?

Task — irregularly sampled multivariate series with a sparse outcome (``TSCANData``; V = ``num_vars``,
T = ``num_times``, R = ``num_relevant``, w = ``window``, p = ``observe_prob``). One example is drawn as:

1. values z[t, v] ~ N(0, 1), independent for every time slot t < T and variable v < V.
2. observed[t, v] ~ Bernoulli(p), independent per cell (irregular sampling); unobserved cells are given as 0.
3. the dataset's relevant cells (the same for every example): relevant variable k = 0 … R−1 is
   ``r_k = k · (V // R)`` and its relevant window is the w slots ``s_k … s_k + w − 1`` with
   ``s_k = T − w − k · (T // R)`` (R = 2, T = 12, w = 3: variable 0 at slots 9–11, variable V/2 at slots 3–5).
   If none of a window's w cells came out observed, one of them, drawn uniformly, is marked observed.
4. score = Σ_k mean of z[t, r_k] over the observed cells of window k; label = 1 if score > 0, else 0 (balanced by
   symmetry, and a function of the observed cells only, so 100 % accuracy is reachable).
5. every other cell is a distractor: a *time distractor* (a relevant variable outside its window) or an *item
   distractor* (any cell of the other V − R variables); ``kind`` marks them 1 and 2 (0 = relevant).

Draw order per batch (one generator, :meth:`AppData.rng`): z (B, T, V), the observation draws (B, T, V), then for
each k the fallback slot (B,). Arrays: ``values`` (B, T, V) float32 (0 where unobserved), ``observed`` (B, T, V)
bool, ``label`` (B,) float32, ``kind`` (B, T, V) int64 (the same map in every row; the model never reads it).

Model: each cell is a token ``value · w_value + e_var[v] + e_time[t] (+ e_missing if unobserved)``, flattened
row-major (token t·V + v); ``depth`` pre-norm blocks of [tscan layer on (grid, observed), MLP]; the mean of the
observed tokens (the released code's global average pooling) → a linear logit. Loss: binary cross-entropy.

Variants (same parameters, same data): ``tscan`` — the layer's factorised keys (row and column means), so every
query's logits split into a time-node term plus an item term (a product of a time softmax and an item softmax only
on a fully observed grid: with unobserved cells the softmax runs over the observed ones); ``plain`` —
``factorised=False``, each cell's own key: plain joint attention over the same cells.

Metrics: ``accuracy``, ``auc`` (:func:`attnlab.lab.apps.metrics.auc_term`: the rank AUC of the logits per eval
batch, averaged over the batches that hold both classes), and the attention of the trained model read from the
layers' probs (``record_probs``; observed queries only, averaged over sites, heads and queries): ``relevant_mass``
(on relevant cells), ``time_distractor_mass``, ``item_distractor_mass`` (the three sum to 1), ``relevant_chance``
(the share of observed keys that are relevant, weighted like the queries: what uniform attention over the
observed cells would give) and ``best_head_relevant_mass`` (the largest per-(site, head) mean relevant mass of the
batch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.errors import ShapeError
from attnlab.functional.masks import full
from attnlab.lab.apps import APPS
from attnlab.lab.apps.base import App, AppData
from attnlab.lab.apps.host import AppConfig, AppModel, recording_probs
from attnlab.lab.apps.metrics import auc_term
from attnlab.lab.tasks.base import check
from attnlab.layers import LAYERS
from attnlab.params import Range, validated

__all__ = ["TSCANApp", "TSCANData", "TSCANModel", "cell_kinds"]

RELEVANT, TIME_DISTRACTOR, ITEM_DISTRACTOR = 0, 1, 2


def cell_kinds(num_times: int, num_vars: int, num_relevant: int, window: int) -> np.ndarray:
    """(num_times, num_vars) int64 map of step 3 and 5 of the module docstring: 0 relevant, 1 time distractor,
    2 item distractor."""
    kinds = np.full((num_times, num_vars), ITEM_DISTRACTOR, dtype=np.int64)
    for k in range(num_relevant):
        var, start = k * (num_vars // num_relevant), num_times - window - k * (num_times // num_relevant)
        kinds[:, var] = TIME_DISTRACTOR
        kinds[start:start + window, var] = RELEVANT
    return kinds


class TSCANData(AppData):
    """Irregularly sampled series whose binary outcome depends on a few variables in a few windows (module
    docstring). Raises ConfigError for a value out of range, ``num_relevant > num_vars`` or windows that do not fit
    (``num_times − window − (num_relevant − 1) · (num_times // num_relevant) < 0``)."""

    name = "tscan"

    @validated
    def __init__(self, num_vars: Annotated[int, Range(ge=1, le=64)] = 8,
                 num_times: Annotated[int, Range(ge=1, le=64)] = 12,
                 num_relevant: Annotated[int, Range(ge=1, le=64)] = 2,
                 window: Annotated[int, Range(ge=1, le=64)] = 3,
                 observe_prob: Annotated[float, Range(gt=0.0, le=1.0)] = 0.5,
                 seed: Annotated[int, Range(ge=0)] = 0) -> None:
        check(num_relevant <= num_vars, self.name, f"num_relevant={num_relevant} must be <= num_vars={num_vars}")
        last_start = num_times - window - (num_relevant - 1) * (num_times // num_relevant)
        check(last_start >= 0, self.name, f"the relevant windows do not fit: num_times={num_times}, "
              f"window={window}, num_relevant={num_relevant} put window {num_relevant - 1} at slot {last_start}")
        self.num_vars, self.num_times, self.num_relevant, self.window = num_vars, num_times, num_relevant, window
        self.observe_prob, self.seed = observe_prob, seed
        self.kinds = cell_kinds(num_times, num_vars, num_relevant, window)

    def sample(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        B, T, V = batch_size, self.num_times, self.num_vars
        z = rng.standard_normal((B, T, V))
        observed = rng.random((B, T, V)) < self.observe_prob
        score = np.zeros(B)
        rows = np.arange(B)
        for k in range(self.num_relevant):
            var, start = k * (V // self.num_relevant), T - self.window - k * (T // self.num_relevant)
            slots = slice(start, start + self.window)
            fallback = start + rng.integers(0, self.window, size=B)
            empty = ~observed[:, slots, var].any(axis=1)
            observed[rows[empty], fallback[empty], var] = True
            seen = observed[:, slots, var]
            score += (z[:, slots, var] * seen).sum(axis=1) / seen.sum(axis=1)
        return {"values": np.where(observed, z, 0.0), "observed": observed, "label": (score > 0).astype(np.float32),
                "kind": np.broadcast_to(self.kinds, (B, T, V)).copy()}


class TSCANModel(AppModel):
    """Cell embeddings → ``depth`` × [tscan attention site, MLP] → mean of observed tokens → logit (module
    docstring). ``forward(values, observed, **batch)`` → logits (B,) float32; ShapeError for values/observed that
    are not matching (B, T, V) with T <= max_times and V <= max_vars."""

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config)
        args, width, heads = config.model_args, config.hidden_size, config.num_attention_heads
        factorised = config.variant == "tscan"
        self.max_times, self.max_vars = args["max_times"], args["max_vars"]
        self.value_proj = nn.Linear(1, width)
        self.var_embed = nn.Embedding(self.max_vars, width)
        self.time_embed = nn.Embedding(self.max_times, width)
        self.missing = nn.Parameter(torch.zeros(width))
        nn.init.normal_(self.var_embed.weight, std=0.5)
        nn.init.normal_(self.time_embed.weight, std=0.5)
        hidden = int(width * args["mlp_ratio"])
        # not AppBlock: these modules are created norms, sites, MLPs (not per block), so folding would change the
        # random initialisation and every documented number
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(2 * args["depth"]))
        self.sites = nn.ModuleList(
            self.site(LAYERS.get("tscan")(width, heads, factorised=factorised, mask_mod=full()))
            for _ in range(args["depth"]))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
                                  for _ in range(args["depth"]))
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)
        self.finish_sites()

    def forward(self, values: Tensor, observed: Tensor, **batch: Tensor) -> Tensor:
        if values.dim() != 3 or observed.shape != values.shape or observed.dtype != torch.bool:
            raise ShapeError(f"expected values (B, T, V) float and observed of the same shape as bool, got "
                             f"{tuple(values.shape)} and {observed.dtype} {tuple(observed.shape)}")
        B, T, V = values.shape
        if T > self.max_times or V > self.max_vars:
            raise ShapeError(f"expected at most {self.max_times} time slots and {self.max_vars} variables "
                             f"(model_args max_times/max_vars), got {T} and {V}")
        x = (self.value_proj(values[..., None].to(self.missing.dtype))
             + self.var_embed.weight[:V] + self.time_embed.weight[:T, None]
             + self.missing * (~observed)[..., None])  # (B, T, V, C)
        hidden = x.reshape(B, T * V, -1)  # row-major cells: token t·V + v
        flat = observed.reshape(B, T * V)
        for site, mlp, norm_a, norm_m in zip(self.sites, self.mlps, self.norms[0::2], self.norms[1::2]):
            hidden = hidden + site(norm_a(hidden), grid=(T, V), observed=flat)
            hidden = hidden + mlp(norm_m(hidden))
        weights = flat.to(hidden.dtype)[..., None]
        pooled = (self.final_norm(hidden) * weights).sum(1) / weights.sum(1).clamp_min(1)
        return self.head(pooled).squeeze(-1)


@APPS.register("tscan")
class TSCANApp(App):
    """TSCAN's factorised time × item attention vs plain joint attention on a sparse clinical-style outcome."""

    layer = "tscan"
    data_class = TSCANData
    model_class = TSCANModel
    variants = {"tscan": "TSCAN: keys pooled per time node and per item; logits = a time-node term + an item term "
                         "(a product of softmaxes only on a fully observed grid)",
                "plain": "plain joint softmax attention over the same cells (each cell's own key)"}
    headline = "accuracy"
    higher_is_better = True
    defaults = {"steps": 1000, "lr": 3e-3, "batch_size": 32, "eval_every": 250, "eval_batches": 16}
    model_defaults = {"depth": 2, "mlp_ratio": 2.0, "max_times": 64, "max_vars": 64}
    # max_times, max_vars are table sizes (>= the data's num_times, num_vars), not shared values: the forward
    # refuses a larger grid with a ShapeError naming them
    model_hints = {"depth": Annotated[int, Range(ge=1, le=32)], "mlp_ratio": Annotated[float, Range(gt=0.0, le=64.0)],
                   "max_times": Annotated[int, Range(ge=1, le=4096)], "max_vars": Annotated[int, Range(ge=1, le=4096)]}

    def loss(self, model: AppModel, batch: Mapping[str, Tensor]) -> Tensor:
        logits = model(**batch)
        return F.binary_cross_entropy_with_logits(logits, batch["label"])

    def metrics(self, model: AppModel, batch: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
        with recording_probs(site.layer for site in model.attention_sites) as layers:
            logits = model(**batch)
            probs = torch.stack([layer.last_probs for layer in layers], dim=1)  # (B, S, H, N, N)
        labels = batch["label"]
        B = labels.shape[0]
        observed = batch["observed"].reshape(B, -1)  # (B, N)
        kinds = F.one_hot(batch["kind"].reshape(B, -1), 3).to(probs.dtype)  # (B, N, 3)
        mass = probs @ kinds[:, None, None]  # (B, S, H, N, 3)
        queries = observed[:, None, None, :, None].to(probs.dtype)
        per_head = (mass * queries).sum(dim=(0, 3)) / observed.sum()  # (S, H, 3): mean over observed queries
        count = float(observed.sum()) * probs.shape[1] * probs.shape[2]
        totals = (mass * queries).sum(dim=(0, 1, 2, 3))  # (3,)
        seen = observed.to(probs.dtype).sum(1)  # (B,) observed cells = observed queries = observed keys
        chance = (kinds[..., RELEVANT] * observed).sum(1)  # (B,): seen · (share of observed keys that are relevant)
        return {"accuracy": (float(((logits > 0).float() == labels).sum()), float(B)),
                "auc": auc_term(logits, labels),
                "relevant_mass": (float(totals[RELEVANT]), count),
                "time_distractor_mass": (float(totals[TIME_DISTRACTOR]), count),
                "item_distractor_mass": (float(totals[ITEM_DISTRACTOR]), count),
                "relevant_chance": (float(chance.sum()), float(seen.sum())),
                "best_head_relevant_mass": (float(per_head[..., RELEVANT].max()), 1.0)}
