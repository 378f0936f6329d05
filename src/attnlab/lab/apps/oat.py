"""OAT — Object-level Attention Transformer for gaze scanpath prediction (Fang et al. 2024, ECCV), on synthetic
visual search: predict the sequence of objects a searcher fixates, with OAT's object positional encoding (layer
``object_attention``) or the plain sinusoidal encoding of positions.

Task (:class:`OATData`). A scene has ``N = num_objects`` objects on a ``grid × grid`` display (coordinates in
[0, 1]²) and one target. One batch is drawn with one numpy Generator (``AppData.rng``), in this order:

1. layout: for each row, ``N`` distinct cells of the grid (``rng.choice(grid², N, replace=False)``; cell index
   ``r·grid + c`` is column c, row r); then one ``(B, N, 2)`` uniform jitter in ``[-jitter, jitter)`` cell widths.
   Centre = ``((c + 0.5 + jitter_x) / grid, (r + 0.5 + jitter_y) / grid)``.
2. size: ``(B, N)`` integers in {0, 1}; the box is the centre ± ``(0.2 + 0.1·size) / grid`` on both axes.
3. target: ``(B,)`` index t in [0, N); ``(B,)`` appearance pair p_t in [0, K) with ``K = num_colours·num_shapes``;
   ``(B, N)`` distractor pairs in [0, K − 1), each raised by 1 when ≥ p_t (uniform over the other K − 1 pairs, so
   the target is the only object with both features), then object t gets p_t. Pair p is colour ``p // num_shapes``
   and shape ``p % num_shapes``.
4. noise: one ``(B, N, N)`` Gumbel(0, 1) array; step k of row b uses ``gumbel[b, k]``.

Search model (the scanpath, our decision; the paper fits human data). Similarity to the target
``sim_j = ½[colour_j = colour_t] + ½[shape_j = shape_t]`` (1 for the target only; size is a distractor feature).
The gaze starts at the display centre f_0 = (0.5, 0.5). At step k it fixates the not-yet-fixated object with the
largest ``target_weight·sim_j − distance_weight·‖c_j − f_k‖ + noise·gumbel[k, j]`` (a draw from the softmax of
the utilities at temperature ``noise``), moves there (f_{k+1} = c_j) and stops after fixating the target; objects
are never fixated twice, so a scanpath has 1 … N fixations. ``optimal[b, k]`` is that softmax's largest
probability: the next-fixation accuracy of a model that knows the search model.

Batch: ``colour, shape, size`` (B, N) int64; ``boxes`` (B, N, 4) float32 (x0, y0, x1, y1); ``target_colour,
target_shape, target_index, length`` (B,) int64; ``scanpath`` (B, N) int64 (fixated objects, −1 after the end);
``optimal`` (B, N) float32 (0 after the end).

Model (:class:`OATModel`), as OAT (encoder–decoder, pointer over objects) with attnlab sites:

- tokens: an object is ``E_colour + E_shape + E_size + W_pe·e(centre)``, e the variant's encoding (the paper
  concatenates appearance and encoding; a linear map of the concatenation is this sum); the target token (first,
  as in the released code) is ``E_colour + E_shape + e_target`` with no position (its box is NaN).
- encoder: ``encoder_layers`` pre-norm blocks of ``object_attention`` (bidirectional, boxes = the objects') + MLP.
- decoder: token k is the start (learned, at the display centre) for k = 0 and the object fixated at step k − 1
  otherwise, plus a sinusoidal encoding of k (the paper's 1D encoding). Each of ``decoder_layers`` blocks is one
  ``object_attention`` over ``[memory ; decoder tokens]`` whose keep mask lets a decoder token see every memory
  token and the decoder tokens up to itself (self- and cross-attention in one softmax; memory rows see the memory
  only and their outputs are dropped), then an MLP.
- pointer (the paper's cross-attention readout): logit of object j at step k = ``(W_d h_k)·(W_m m_j)/√C``, plus a
  stop logit ``w·h_k + b``. Objects already fixated are masked out (the search model never refixates).

Variants: ``object_pe`` (OAT's encoding: Gaussian similarity of positions, σ = ``sigma``) and ``plain_pe`` (the
sinusoidal encoding); they differ only in the encoding, at the input and in the attention logits.

Loss: cross-entropy of the next fixation (then stop) at every step of the scanpath (teacher forcing).
Metrics: ``next_fix_acc`` (teacher forced, fixation steps), ``optimal_acc`` (the search model's own ceiling on the
same steps), ``scanpath_sim`` (headline: the sequence score of the released code between the greedy predicted
scanpath and the generated one, i.e. longest common subsequence / longer length), ``length_error`` (|predicted − true| length),
``attn_distance`` (mean display distance from the current fixation to the objects the first decoder site attends
to, weighted by its probabilities and averaged over heads; the mean distance to all unvisited objects is
``object_distance``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.functional.masks import full
from attnlab.lab.apps import APPS
from attnlab.lab.apps.base import App, AppData
from attnlab.lab.apps.host import AppBlock, AppModel, recording_probs
from attnlab.layers import LAYERS
from attnlab.layers.object_attention import encode_boxes
from attnlab.params import Range, validated

__all__ = ["OAT", "OATData", "OATModel", "search_scanpaths", "sequence_score"]

MAX_APPEARANCE = 16  # embedding rows for colours and shapes (num_colours, num_shapes ≤ 16)
CENTRE = (0.5, 0.5)


def search_scanpaths(centres: np.ndarray, sim: np.ndarray, target: np.ndarray, gumbel: np.ndarray, *,
                     target_weight: float, distance_weight: float, noise: float) -> tuple[np.ndarray, ...]:
    """Run the search model (module docstring) on drawn scenes.

    Args:
        centres: (B, N, 2) object centres. sim: (B, N) similarity to the target. target: (B,) target index.
        gumbel: (B, N, N) noise, step k uses ``gumbel[:, k]``.

    Returns:
        scanpath (B, N) int64 (−1 after the end), length (B,) int64, optimal (B, N) float (0 after the end).
    """
    batch, n = sim.shape
    rows = np.arange(batch)
    scanpath = np.full((batch, n), -1, dtype=np.int64)
    optimal = np.zeros((batch, n))
    fixation = np.tile(np.asarray(CENTRE), (batch, 1))
    visited = np.zeros((batch, n), dtype=bool)
    done = np.zeros(batch, dtype=bool)
    for k in range(n):
        utility = target_weight * sim - distance_weight * np.linalg.norm(centres - fixation[:, None], axis=-1)
        utility = np.where(visited, -np.inf, utility)
        scaled = (utility - utility.max(axis=1, keepdims=True)) / noise
        probs = np.exp(scaled) / np.exp(scaled).sum(axis=1, keepdims=True)
        choice = np.argmax(utility + noise * gumbel[:, k], axis=1)
        active = ~done
        scanpath[active, k] = choice[active]
        optimal[active, k] = probs.max(axis=1)[active]
        visited[rows[active], choice[active]] = True
        fixation = np.where(active[:, None], centres[rows, choice], fixation)
        done |= choice == target
    return scanpath, (scanpath >= 0).sum(axis=1), optimal


def sequence_score(predicted: list[int], wanted: list[int]) -> float:
    """The released code's sequence score: Needleman–Wunsch alignment with match 1, mismatch 0 and gap 0 (so the
    longest common subsequence) divided by the longer length; 0 for two empty sequences."""
    previous = [0] * (len(wanted) + 1)
    for x in predicted:
        current = [0]
        for j, y in enumerate(wanted, 1):
            current.append(max(previous[j], current[j - 1], previous[j - 1] + (x == y)))
        previous = current
    return previous[-1] / max(len(predicted), len(wanted), 1)


class OATData(AppData):
    """Cluttered scenes, a target and the scanpath of a simple search model (module docstring)."""

    name = "oat"

    @validated
    def __init__(self, num_objects: Annotated[int, Range(ge=2, le=32)] = 12,
                 grid: Annotated[int, Range(ge=2, le=16)] = 4,
                 num_colours: Annotated[int, Range(ge=1, le=MAX_APPEARANCE)] = 3,
                 num_shapes: Annotated[int, Range(ge=1, le=MAX_APPEARANCE)] = 3,
                 target_weight: Annotated[float, Range(ge=0.0, le=100.0)] = 2.0,
                 distance_weight: Annotated[float, Range(ge=0.0, le=100.0)] = 8.0,
                 noise: Annotated[float, Range(gt=0.0, le=100.0)] = 0.5,
                 jitter: Annotated[float, Range(ge=0.0, lt=0.5)] = 0.25,
                 seed: Annotated[int, Range(ge=0)] = 0) -> None:
        """Args: see the module docstring. Raises ConfigError for a value out of range, ``grid² < num_objects`` or
        fewer than two appearance pairs."""
        if grid * grid < num_objects:
            raise ConfigError(f"oat: expected grid² >= num_objects, got grid={grid} and num_objects={num_objects}")
        if num_colours * num_shapes < 2:
            raise ConfigError(f"oat: expected num_colours·num_shapes >= 2 (a target and distractors that differ), "
                              f"got {num_colours}·{num_shapes}")
        self.num_objects, self.grid, self.num_colours, self.num_shapes = num_objects, grid, num_colours, num_shapes
        self.target_weight, self.distance_weight, self.noise = target_weight, distance_weight, noise
        self.jitter, self.seed = jitter, seed

    def sample(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        B, N, g, S = batch_size, self.num_objects, self.grid, self.num_shapes
        rows = np.arange(B)
        cells = np.stack([rng.choice(g * g, N, replace=False) for _ in range(B)])  # (B, N)
        offset = rng.uniform(-self.jitter, self.jitter, size=(B, N, 2))
        centres = (np.stack([cells % g, cells // g], axis=-1) + 0.5 + offset) / g
        size = rng.integers(0, 2, size=(B, N))
        half = ((0.2 + 0.1 * size) / g)[..., None]
        target = rng.integers(0, N, size=B)
        target_pair = rng.integers(0, self.num_colours * S, size=B)
        pairs = rng.integers(0, self.num_colours * S - 1, size=(B, N))
        pairs = pairs + (pairs >= target_pair[:, None])
        pairs[rows, target] = target_pair
        gumbel = rng.gumbel(size=(B, N, N))
        colour, shape = pairs // S, pairs % S
        sim = 0.5 * (colour == colour[rows, target][:, None]) + 0.5 * (shape == shape[rows, target][:, None])
        scanpath, length, optimal = search_scanpaths(centres, sim, target, gumbel, target_weight=self.target_weight,
                                                     distance_weight=self.distance_weight, noise=self.noise)
        return {"colour": colour, "shape": shape, "size": size,
                "boxes": np.concatenate([centres - half, centres + half], axis=-1),
                "target_colour": colour[rows, target], "target_shape": shape[rows, target], "target_index": target,
                "scanpath": scanpath, "length": length, "optimal": optimal}


def step_encoding(steps: int, width: int) -> Tensor:
    """(steps, width) sinusoidal encoding of the decoder step k (base 10000), the paper's 1D positional encoding."""
    position = torch.arange(steps, dtype=torch.float32)[:, None]
    freqs = 10000.0 ** (-torch.arange(0, width, 2, dtype=torch.float32) / width)
    table = torch.zeros(steps, width)
    table[:, 0::2] = torch.sin(position * freqs)
    table[:, 1::2] = torch.cos(position * freqs)
    return table


class OATModel(AppModel):
    """Encoder over the target and objects, decoder over the scanpath so far, pointer over objects (module doc)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        args, width, heads = config.model_args, config.hidden_size, config.num_attention_heads
        encoding = "object" if config.variant == "object_pe" else "sinusoidal"
        self.encoding_args = {"sigma": args["sigma"], "encoding_dim": args["encoding_dim"],
                              "sinusoid_scale": args["sinusoid_scale"]}
        self.encoding = encoding
        layer_args = {"encoding": encoding, **self.encoding_args, "mask_mod": full(), "rope_base": None}
        make = LAYERS.get("object_attention")
        self.colour = nn.Embedding(MAX_APPEARANCE, width)
        self.shape = nn.Embedding(MAX_APPEARANCE, width)
        self.size = nn.Embedding(2, width)
        self.position = nn.Linear(args["encoding_dim"], width, bias=False)
        self.target_type = nn.Parameter(torch.randn(width) * 0.02)
        self.start = nn.Parameter(torch.randn(width) * 0.02)
        ratio = args["mlp_ratio"]
        self.encoder = nn.ModuleList(AppBlock(self.site(make(width, heads, **layer_args)), width, ratio)
                                     for _ in range(args["encoder_layers"]))
        self.decoder = nn.ModuleList(AppBlock(self.site(make(width, heads, **layer_args)), width, ratio)
                                     for _ in range(args["decoder_layers"]))
        self.memory_norm, self.decoder_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.query, self.key = nn.Linear(width, width), nn.Linear(width, width)
        self.stop = nn.Linear(width, 1)
        self.finish_sites()

    def encode_position(self, boxes: Tensor) -> Tensor:
        """(B, T, P) the variant's encoding of the boxes (the layers' own)."""
        return encode_boxes(boxes, self.encoding, **self.encoding_args)

    # -- encoder ------------------------------------------------------------------------------------------------
    def objects(self, colour: Tensor, shape: Tensor, size: Tensor, boxes: Tensor) -> Tensor:
        """(B, N, C) object tokens: appearance + W_pe · e(centre)."""
        return self.colour(colour) + self.shape(shape) + self.size(size) + self.position(self.encode_position(boxes))

    def encode(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """memory (B, 1 + N, C) (target first) and its boxes (B, 1 + N, 4) (the target's NaN)."""
        target = self.colour(batch["target_colour"]) + self.shape(batch["target_shape"]) + self.target_type
        h = torch.cat([target[:, None], self.objects(batch["colour"], batch["shape"], batch["size"],
                                                     batch["boxes"])], dim=1)
        boxes = torch.cat([torch.full_like(batch["boxes"][:, :1], float("nan")), batch["boxes"]], dim=1)
        for block in self.encoder:
            h = block(h, boxes=boxes)
        return self.memory_norm(h), boxes

    # -- decoder ------------------------------------------------------------------------------------------------
    def decode(self, batch: dict[str, Tensor], memory: Tensor, memory_boxes: Tensor, fixated: Tensor) -> Tensor:
        """Logits (B, L, N + 1) over the objects (then stop) for the next fixation after each prefix.

        fixated: (B, L − 1) objects fixated so far (−1 = padding; read as object 0, its rows are not scored)."""
        B, M = memory.shape[:2]
        rows = torch.arange(B)[:, None]
        index = fixated.clamp(min=0)
        centre = memory_boxes.new_tensor(CENTRE * 2)[None, None].expand(B, 1, 4)
        boxes = torch.cat([centre, batch["boxes"][rows, index]], dim=1)  # (B, L, 4)
        tokens = self.objects(batch["colour"][rows, index], batch["shape"][rows, index], batch["size"][rows, index],
                              batch["boxes"][rows, index])
        start = self.start + self.position(self.encode_position(centre[:, 0:1]))[:, 0]
        h = torch.cat([start[:, None], tokens], dim=1)
        L = h.shape[1]
        h = h + step_encoding(L, h.shape[-1]).to(h)
        keep = torch.ones(M + L, M + L, dtype=torch.bool).tril()
        keep[:, :M] = True
        keep[:M, M:] = False
        keep = keep[None].expand(B, M + L, M + L)
        all_boxes = torch.cat([memory_boxes, boxes], dim=1)
        for block in self.decoder:
            h = block(h, memory, boxes=all_boxes, keep=keep)
        h = self.decoder_norm(h)
        objects = memory[:, 1:]  # (B, N, C)
        logits = self.query(h) @ self.key(objects).transpose(1, 2) / math.sqrt(h.shape[-1])  # (B, L, N)
        N = objects.shape[1]
        seen = F.one_hot(index, N).bool() & (fixated >= 0)[..., None]  # (B, L − 1, N)
        visited = torch.cat([seen.new_zeros(B, 1, N), seen.cumsum(dim=1) > 0], dim=1)  # before step k
        logits = logits.masked_fill(visited, float("-inf"))
        return torch.cat([logits, self.stop(h)], dim=-1)

    def forward(self, **batch: Tensor) -> Tensor:
        """Teacher-forced logits (B, N + 1, N + 1): step k predicts ``scanpath[k]``, step ``length`` the stop."""
        memory, memory_boxes = self.encode(batch)
        return self.decode(batch, memory, memory_boxes, batch["scanpath"])

    @torch.no_grad()
    def predict(self, batch: dict[str, Tensor]) -> Tensor:
        """Greedy scanpaths (B, N) (−1 after the predicted stop; at most N fixations)."""
        memory, memory_boxes = self.encode(batch)
        B, N = batch["colour"].shape
        path = torch.full((B, N), -1, dtype=torch.long)
        stopped = torch.zeros(B, dtype=torch.bool)
        for k in range(N):
            choice = self.decode(batch, memory, memory_boxes, path[:, :k])[:, -1].argmax(dim=-1)
            stopped |= choice == N
            path[:, k] = torch.where(stopped, -1, choice)
        return path


def targets(batch: dict[str, Tensor]) -> Tensor:
    """(B, N + 1) next-fixation labels: scanpath[k] for k < length, N (stop) at k = length, −100 after."""
    B, N = batch["scanpath"].shape
    steps = torch.arange(N + 1)[None]
    length = batch["length"][:, None]
    padded = torch.cat([batch["scanpath"], batch["scanpath"].new_full((B, 1), -1)], dim=1)
    return torch.where(steps < length, padded, torch.where(steps == length, N, -100))


@APPS.register("oat")
class OAT(App):
    """OAT (Fang et al. 2024): object-level encoder-decoder scanpath prediction; object vs plain encoding."""

    layer = "object_attention"
    data_class = OATData
    model_class = OATModel
    variants = {"object_pe": "OAT's object positional encoding (Gaussian similarity of positions), in the input "
                             "and the attention logits",
                "plain_pe": "the plain sinusoidal encoding of positions, in the same places"}
    headline = "scanpath_sim"
    higher_is_better = True
    defaults = {"steps": 1200, "lr": 3e-3, "batch_size": 64, "eval_every": 400, "eval_batches": 8}
    model_defaults = {"encoder_layers": 2, "decoder_layers": 2, "mlp_ratio": 2.0, "sigma": 0.2,
                      "encoding_dim": 32, "sinusoid_scale": 10.0}
    model_hints = {"encoder_layers": Annotated[int, Range(ge=1, le=8)],
                   "decoder_layers": Annotated[int, Range(ge=1, le=8)],
                   "mlp_ratio": Annotated[float, Range(gt=0.0, le=64.0)],
                   "sigma": Annotated[float, Range(gt=0.0, le=100.0)],
                   "encoding_dim": Annotated[int, Range(ge=4, le=1024)],
                   "sinusoid_scale": Annotated[float, Range(gt=0.0, le=1e6)]}

    def __init__(self, variant: str | None = None, **kwargs: Any) -> None:
        super().__init__(variant, **kwargs)
        if self.model_args["encoding_dim"] % 4:
            raise ConfigError(f"app oat: expected encoding_dim a multiple of 4, got "
                              f"{self.model_args['encoding_dim']}")

    def loss(self, model: OATModel, batch: dict[str, Tensor]) -> Tensor:
        logits = model(**batch)
        return F.cross_entropy(logits.flatten(0, 1), targets(batch).flatten(), ignore_index=-100)

    def metrics(self, model: OATModel, batch: dict[str, Tensor]) -> dict[str, tuple[float, float]]:
        with recording_probs([model.decoder[0].site.layer]) as (first,):
            logits = model(**batch)
            probs = first.last_probs  # (B, H, M + L, M + L)
        labels = targets(batch)
        length = batch["length"]
        B, N = batch["scanpath"].shape
        fixation_steps = torch.arange(N + 1)[None] < length[:, None]  # (B, N + 1)
        correct = (logits.argmax(dim=-1) == labels) & fixation_steps
        steps = float(fixation_steps.sum())
        out = {"next_fix_acc": (float(correct.sum()), steps),
               "optimal_acc": (float(batch["optimal"].sum()), steps)}
        out.update(self._attention_distance(batch, probs, fixation_steps))
        predicted = model.predict(batch)
        similarity, length_error = 0.0, 0.0
        for row in range(B):
            want = batch["scanpath"][row, : int(length[row])].tolist()
            got = [i for i in predicted[row].tolist() if i >= 0]
            similarity += sequence_score(got, want)
            length_error += abs(len(got) - len(want))
        out["scanpath_sim"] = (similarity, float(B))
        out["length_error"] = (length_error, float(B))
        return out

    @staticmethod
    def _attention_distance(batch: dict[str, Tensor], probs: Tensor,
                            steps: Tensor) -> dict[str, tuple[float, float]]:
        """Probability-weighted display distance from each fixation to the unvisited objects the first decoder
        site attends to (renormalised over them, mean over heads), and the unweighted mean as a reference."""
        B, N = batch["scanpath"].shape
        M = N + 1
        rows = torch.arange(B)[:, None]
        centres = 0.5 * (batch["boxes"][..., :2] + batch["boxes"][..., 2:])  # (B, N, 2)
        path = batch["scanpath"].clamp(min=0)
        fixations = torch.cat([centres.new_tensor(CENTRE).expand(B, 1, 2), centres[rows, path]], dim=1)[:, : N + 1]
        distance = torch.cdist(fixations, centres)  # (B, N + 1, N)
        seen = F.one_hot(path, N).bool() & (batch["scanpath"] >= 0)[..., None]
        visited = torch.cat([seen.new_zeros(B, 1, N), seen.cumsum(dim=1) > 0], dim=1)[:, : N + 1]
        weights = probs[:, :, M:, 1:M].mean(dim=1).masked_fill(visited, 0.0)  # (B, N + 1, N)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        attended = (weights * distance).sum(dim=-1)
        unvisited = (~visited).float()
        uniform = (unvisited * distance).sum(dim=-1) / unvisited.sum(dim=-1).clamp_min(1.0)
        count = float(steps.sum())
        return {"attn_distance": (float(attended[steps].sum()), count),
                "object_distance": (float(uniform[steps].sum()), count)}
