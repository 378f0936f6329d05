"""CARVE: contrast the task query's attention over image tokens with a generic instruction's, keep the top regions.

Ge et al., "Focusing by Contrastive Attention: Enhancing VLMs' Visual Reasoning" (arXiv 2509.06461; METHODS.md
#19, low confidence: abstract + a topic page, § not available (abstract only); the exact formula, λ, layers and
mask ratio are not recovered). The attention of text queries over the visual tokens factors roughly as
A(x, q) ≈ N(x) ⊙ S(x, q): a question-independent "visual noise" N and the question's semantic signal S. A
generic instruction g ("Describe this image.") gives A(x, g) ≈ N(x), so per image token v

    Â_v = A_v(x, q) / (A_v(x, g) + λ)

keeps the signal. attnlab's reading: A_v is the attention of the question's tokens (in the generic map: of the
generic instruction's tokens in its place) to image token v, renormalised over the image's tokens per (head, query),
averaged over heads, those queries and the selected layers (default: the second half of the layers, where the
paper finds attention focused; our choice). The top ``keep`` fraction of image tokens by Â (default 0.3, our
choice) is kept; the image outside them is masked in pixel space (:func:`mask_pixels`) and the model re-queried.
The per-layer entropy of the task map, H = -Σ ā_v log ā_v, is the paper's visual-complexity diagnostic.

Query tokens (our choice; the paper's are not recovered): the two prompts differ only in the user's text, q or g
(:func:`generic_batch` replaces the question span, keeping the image's closing marker before it and the end of the
turn and the assistant prompt after it). Each map is read from the tokens of its own instruction, the question span
in the task prompt and the generic span in the generic prompt: the tokens that carry q and g. The tokens after the
span (the template's suffix, the last of which predicts the answer) are the same in both prompts but are left out;
what counts as the question is :mod:`attnlab.analyses.vlm_batches`' rule (text after the image's closing markers
up to the next special token, the end of the turn). A template that closes the turn with plain text (LLaVA-1.5's
`` ASSISTANT:``) has that text taken for part of the question: replaced by g in the generic prompt, and a query of
the task map only.

``carve`` (analysis): per batch, the generic batch is built with :func:`generic_batch`; rows ``image_entropy``
(task) and ``generic_image_entropy`` per layer, ``requery_kl`` (KL(p_orig ‖ p_masked) of the last token's next-token
distribution) and ``answer_changed`` (argmax differs), extras ``maps`` (per image, in the report's ImageOverlay
record form: ``sequence``, ``image_index``, ``grid`` rows × cols of the contrast, ``markers`` the kept tokens [row,
col], ``title``). The full pipeline from a PIL image and a question (masking the original image, generation) is
:func:`attnlab.protocols.carve.carve`; the analysis masks the processed ``pixel_values`` (LLaVA's (N, C, H, W),
Idefics3's (B, n, C, H, W)); Qwen2-VL's flattened patches are refused (use ``attnlab.carve``).

Shapes: B batch, L tokens, H heads, P = rows · cols tokens of one image.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor

from attnlab.analyses import ANALYSES
from attnlab.analyses.vlm_batches import prompt_markers, question_mask, repack_rows
from attnlab.analyses.base import Analysis, Runner
from attnlab.analyses.vhd import check_images_reach_model, image_mask, image_token_ids, model_inputs
from attnlab.errors import ConfigError, ShapeError
from attnlab.facts import ModelFacts
from attnlab.params import IndexList, Range, validated
from attnlab.probes.base import Row, RowWriter
from attnlab.report.sections import Column, LayerCurve, Section, Series, Table, Text
from attnlab.roles import ImageSpan, TokenRoles


@dataclass(frozen=True)
class CarveMap:
    """One image's CARVE maps, each (rows, cols) float64 (frames averaged).

    Attributes:
        span: the image (sequence, start, grid). task, generic: mean renormalised attention of the task question's
            / generic instruction's text queries to each image token. contrast: task / (generic + λ).
        keep: (rows, cols) bool, the kept tokens (top ``keep`` fraction by contrast).
    """

    span: ImageSpan
    task: Tensor
    generic: Tensor
    contrast: Tensor
    keep: Tensor


def image_attention(probs: Tensor, queries: Tensor, span: ImageSpan) -> Tensor:
    """(rows, cols) float64: the attention of ``queries`` to ``span``'s tokens, renormalised over the span per
    (head, query), averaged over heads, queries and frames.

    Args:
        probs: (B, H, L, L) one layer's attention probs. queries: (B, L) bool, the query tokens.
    Raises:
        ConfigError: the span's sequence has no query token.
    """
    rows = queries[span.sequence].nonzero().flatten()
    if rows.numel() == 0:
        raise ConfigError(f"sequence {span.sequence} has no query token (question text after its image)")
    mass = probs[span.sequence][:, rows.to(probs.device), span.start: span.end].double()  # (H, nq, P)
    mass = mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return mass.mean((0, 1)).cpu().view(span.frames, span.rows, span.cols).mean(0)


def contrast(task: Tensor, generic: Tensor, lam: float) -> Tensor:
    """Â = task / (generic + λ), elementwise (any shape). ConfigError for λ < 0 or shapes that differ."""
    if lam < 0:
        raise ConfigError(f"lam must be >= 0, got {lam}")
    if task.shape != generic.shape:
        raise ShapeError(f"task and generic maps differ in shape: {tuple(task.shape)} vs {tuple(generic.shape)}")
    return task / (generic + lam)


def keep_top(scores: Tensor, keep: float) -> Tensor:
    """Bool of ``scores``' shape: the ``max(1, round(keep · numel))`` highest entries (ties by index)."""
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep must be in (0, 1], got {keep}")
    count = max(1, int(round(keep * scores.numel())))
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[torch.argsort(scores.flatten().nan_to_num(float("-inf")), descending=True, stable=True)[:count]] = True
    return chosen.view(scores.shape)


def mask_pixels(pixels: Tensor, keep: Tensor, fill: float = 0.0) -> Tensor:
    """The image with every pixel outside the kept tokens set to ``fill``.

    Args:
        pixels: (C, Hpix, Wpix) one image as the model reads it (LLaVA-style ``pixel_values[i]``). keep: (rows,
            cols) bool token grid, stretched over the image (nearest). fill: the value of masked pixels (0 = the
            normalisation mean colour in normalised space).
    Raises:
        ShapeError: pixels not 3-D.
    """
    if pixels.dim() != 3:
        raise ShapeError(f"mask_pixels takes one image (channels, height, width), got shape {tuple(pixels.shape)}")
    grid = keep.float()[None, None]
    upsampled = torch.nn.functional.interpolate(grid, size=pixels.shape[-2:], mode="nearest")[0, 0].bool()
    return torch.where(upsampled.to(pixels.device), pixels, torch.full_like(pixels, fill))


def mask_images(pixels: Tensor, keeps: Sequence[Tensor], fill: float = 0.0) -> Tensor:
    """``pixel_values`` with image i masked outside ``keeps[i]`` (:func:`mask_pixels`), images in batch order.

    Args:
        pixels: (N, C, H, W) one entry per image (LLaVA), or (B, n, C, H, W) with all-zero padding images (Idefics3:
            every tile and the global image are entries, each its own token run).
        keeps: one (rows, cols) bool grid per image token run, in batch order.
    Raises:
        ConfigError: the number of (real) images differs from the number of grids.
    """
    real = ~(pixels == 0).flatten(2).all(-1) if pixels.dim() == 5 else None
    flat = pixels[real] if real is not None else pixels
    if flat.shape[0] != len(keeps):
        raise ConfigError(f"pixel_values hold {flat.shape[0]} images but the tokens hold {len(keeps)} image runs; "
                          "use attnlab.carve with the image file")
    masked = torch.stack([mask_pixels(image, keep, fill) for image, keep in zip(flat, keeps)]) if keeps else flat
    if real is None:
        return masked
    out = pixels.clone()
    out[real] = masked
    return out


def entropy(distribution: Tensor) -> float:
    """-Σ p log p (nats) of a distribution (any shape, summing to 1; zeros contribute 0)."""
    p = distribution.double().flatten()
    return float(-(p * p.clamp_min(torch.finfo(torch.float64).tiny).log()).sum())


def generic_batch(batch: dict[str, Tensor], ids: Sequence[int], generic_ids: Sequence[int], *,
                  markers: Collection[int] = (), ends: Collection[int] = ()
                  ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The batch with each row's question replaced by ``generic_ids``: "the same prompt with g in place of q".

    The question is found by :func:`attnlab.analyses.vlm_batches.question_mask` (``markers``, ``ends`` from
    :func:`~attnlab.analyses.vlm_batches.prompt_markers`): the tokens before it (the image and its closing
    markers) and after it (the end of the user's turn, the assistant prompt) are kept; same padding side and pad
    id, same image inputs.

    Returns:
        ``(generic batch, task queries (B, L) bool, generic queries (B, L') bool)``: the question's tokens in
        ``batch`` and the generic instruction's tokens in the generic batch, the query rows of the two maps.
    Raises:
        ConfigError: ``generic_ids`` is empty, a row has no image or no question text after it.
    """
    if not generic_ids:
        raise ConfigError("the generic instruction tokenises to no token")
    input_ids = batch["input_ids"]
    valid = batch.get("attention_mask", torch.ones_like(input_ids)).bool()
    question = question_mask(input_ids, valid, image_mask(input_ids, ids) & valid, markers, ends)
    generic = torch.tensor(list(generic_ids), dtype=input_ids.dtype, device=input_ids.device)
    rows, spans = [], []
    for b in range(input_ids.shape[0]):
        real = valid[b].nonzero().flatten()
        asked = question[b, real].nonzero().flatten()
        start, end = int(asked[0]), int(asked[-1]) + 1
        row = input_ids[b, real]
        rows.append(torch.cat([row[:start], generic, row[end:]]))
        spans.append(start)
    new_ids, new_mask, offsets = repack_rows(rows, input_ids, valid)
    queries = torch.zeros_like(new_mask, dtype=torch.bool)
    for b, start in enumerate(spans):
        begin = int(offsets[b]) + start
        queries[b, begin: begin + len(generic)] = True
    return {**batch, "input_ids": new_ids, "attention_mask": new_mask}, question, queries


def carve_maps(runner: Runner, batch: dict[str, Tensor], generic: dict[str, Tensor], *, ids: Sequence[int],
               queries: tuple[Tensor, Tensor], layers: Sequence[int], lam: float, keep: float, merge: int = 1
               ) -> tuple[list[CarveMap], Tensor, Tensor]:
    """CARVE maps of every image of ``batch`` (task) against ``generic`` (the same images, generic instruction).

    ``queries`` are the query tokens of the two maps, ((B, L) bool in ``batch``, (B, L') bool in ``generic``):
    the question's and the generic instruction's tokens (:func:`generic_batch` returns both).

    Each image's grid comes from the batch's ``image_grid_thw`` (Qwen2-VL; its h, w divided by ``merge``, the
    model's ``facts.vision["merge"]``) or is the square of its token run (LLaVA, Idefics3 tiles, Gemma 3).

    Returns:
        ``(maps, task_entropy, generic_entropy)``: one :class:`CarveMap` per image (batch order) and the per-layer
        entropies (num_layers, num_images) float64 of the renormalised task / generic maps.
    Raises:
        ConfigError: the two batches hold different images, a sequence without an image or query text.
    """
    maps, entropies = [], []
    per_layer: list[list[Tensor]] = []
    for source, asked in zip((batch, generic), queries):
        inputs = model_inputs(source)
        valid = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
        grids = inputs.get("image_grid_thw")
        roles = TokenRoles.from_input_ids(inputs["input_ids"], valid, ids, grids=grids,
                                          merge=merge if grids is not None else 1)
        with torch.no_grad():
            probs = runner.attention_probs(inputs)
        grids = [[image_attention(p, asked, span) for span in roles.images] for p in probs]  # [layer][image]
        per_layer.append(grids)
        entropies.append(torch.tensor([[entropy(g) for g in layer] for layer in grids], dtype=torch.float64))
        maps.append(roles.images)
    spans, generic_spans = maps
    if [(s.sequence, s.rows, s.cols, s.frames) for s in spans] != \
            [(s.sequence, s.rows, s.cols, s.frames) for s in generic_spans]:
        raise ConfigError("the task and generic batches must hold the same images in the same sequences")
    out = []
    for number, span in enumerate(spans):
        task = torch.stack([per_layer[0][layer][number] for layer in layers]).mean(0)
        plain = torch.stack([per_layer[1][layer][number] for layer in layers]).mean(0)
        score = contrast(task, plain, lam)
        out.append(CarveMap(span, task, plain, score, keep_top(score, keep)))
    return out, entropies[0], entropies[1]


@ANALYSES.register("carve")
class CarveAnalysis(Analysis):
    """CARVE contrast maps over image tokens, the masked-image re-query's effect, and visual attention entropy.

    Args:
        generic: the generic instruction g (default "Describe this image."). layers: layers averaged (default the
            second half). lam: λ ≥ 0 (default 1e-3). keep: fraction of image tokens kept (default 0.3). fill: value
            of masked pixels in normalised pixel space (default 0). max_maps: maps kept in the extras (default 8).
    """

    shardable = True  # state() and the map hit list are the whole state
    hit_lists = ("maps",)

    sections = (Section("probe-carve", "CARVE: contrastive attention over image tokens", (
        Text(template="Generic instruction: {generic}; layers {layers}; λ = {lam}; kept {keep} of the image tokens. "
                      "Re-query with the rest masked: mean KL {requery_kl}, answers changed {answer_changed}."),
        LayerCurve((Series("image_entropy", "task query", "nats"),
                    Series("generic_image_entropy", "generic instruction", "nats")),
                   alt="Entropy of the attention over image tokens per layer",
                   caption="Entropy of text queries' attention over the image (renormalised), per layer."),
        Table((Column("sequence", "sequence"), Column("image_index", "image"),
               Column("markers", "kept tokens (row, col)")),
              extras="maps", caption="Kept image tokens (top contrast)."),
    )),)

    @validated
    def __init__(self, generic: str = "Describe this image.", layers: IndexList | None = None,
                 lam: Annotated[float, Range(ge=0.0, le=1e6)] = 1e-3,
                 keep: Annotated[float, Range(gt=0.0, le=1.0)] = 0.3,
                 fill: Annotated[float, Range(ge=-1e6, le=1e6)] = 0.0,
                 max_maps: Annotated[int, Range(ge=0)] = 8) -> None:
        self.generic, self.layers, self.lam, self.keep, self.fill = generic, layers, lam, keep, fill
        self.max_maps = max_maps

    def prepare(self, facts: ModelFacts, runner: Runner) -> None:
        super().prepare(facts, runner)
        self.ids = image_token_ids(facts, runner.model)
        self.merge_size = int((getattr(facts, "vision", None) or {}).get("merge") or 1)
        L = facts.num_layers
        self.chosen = list(self.layers) if self.layers is not None else list(range(L // 2, L))
        if max(self.chosen) >= L:
            raise ConfigError(f"carve: layers={self.chosen} but the model has {L} layers")
        if runner.tokenizer is None:
            raise ConfigError("carve tokenises the generic instruction; the model has no tokenizer")
        self.generic_ids = list(runner.tokenizer(self.generic, add_special_tokens=False)["input_ids"])
        self.markers, self.ends = prompt_markers(runner.tokenizer)
        self.entropy_sum = torch.zeros(L, dtype=torch.float64)
        self.generic_entropy_sum = torch.zeros(L, dtype=torch.float64)
        self.images = torch.zeros((), dtype=torch.float64)
        self.kl_sum = torch.zeros((), dtype=torch.float64)
        self.changed = torch.zeros((), dtype=torch.float64)
        self.sequences = torch.zeros((), dtype=torch.float64)
        self.maps: list[tuple[int, int, list[list[float]], list[list[int]]]] = []

    def observe(self, runner: Runner, batch: dict[str, Tensor]) -> None:
        if not getattr(self, "_runner_checked", False):
            check_images_reach_model(runner, batch)
            self._runner_checked = True
        pixels = batch.get("pixel_values")
        if pixels is None or pixels.dim() not in (4, 5):
            raise ConfigError("carve masks images in pixel space and needs pixel_values (num_images, channels, "
                              "height, width) (LLaVA-style) or (batch, images, channels, height, width) (Idefics3), "
                              "which this processor does not give (Qwen2-VL flattens patches): drop --probe carve to "
                              "run the other probes, or use attnlab vlm carve (attnlab.carve) on the image file")
        generic, asked, plain = generic_batch(batch, self.ids, self.generic_ids, markers=self.markers, ends=self.ends)
        maps, task_entropy, generic_entropy = carve_maps(runner, batch, generic, ids=self.ids, queries=(asked, plain),
                                                         layers=self.chosen, lam=self.lam, keep=self.keep,
                                                         merge=self.merge_size)
        self.entropy_sum += task_entropy.sum(1)
        self.generic_entropy_sum += generic_entropy.sum(1)
        self.images += len(maps)
        masked = mask_images(pixels, [m.keep for m in maps], self.fill)
        inputs = model_inputs(batch)
        with torch.no_grad():
            before = runner.forward(inputs).logits
            after = runner.forward({**inputs, "pixel_values": masked}).logits
        valid = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
        last = torch.where(valid, torch.arange(valid.shape[1], device=valid.device), -1).max(-1).values
        rows = torch.arange(valid.shape[0], device=valid.device)
        p = before[rows, last].double().log_softmax(-1)
        q = after[rows, last].double().log_softmax(-1)
        self.kl_sum += (p.exp() * (p - q)).sum().cpu()
        self.changed += (p.argmax(-1) != q.argmax(-1)).sum().cpu().double()
        for m in maps:
            if len(self.maps) < self.max_maps:
                self.maps.append((int(self.sequences) + m.span.sequence, m.span.index,
                                  [[round(float(v), 6) for v in row] for row in m.contrast],
                                  m.keep.nonzero().tolist()))
        self.sequences += valid.shape[0]

    def state(self) -> dict[str, Tensor]:
        return {"entropy_sum": self.entropy_sum, "generic_entropy_sum": self.generic_entropy_sum,
                "images": self.images, "kl_sum": self.kl_sum, "changed": self.changed, "sequences": self.sequences}

    def rows(self) -> list[Row]:
        out = RowWriter(self.name)
        if not hasattr(self, "images") or float(self.images) == 0:
            return out.rows
        for layer in range(self.facts.num_layers):
            out.add("image_entropy", float(self.entropy_sum[layer] / self.images), layer=layer)
            out.add("generic_image_entropy", float(self.generic_entropy_sum[layer] / self.images), layer=layer)
        out.add("requery_kl", float(self.kl_sum / self.sequences))
        out.add("answer_changed", float(self.changed / self.sequences))
        return out.rows

    def extras(self, decode: Any = None) -> dict[str, Any]:
        if not hasattr(self, "images"):
            return {"maps": []}
        seen = float(self.sequences) or float("nan")
        return {"generic": self.generic, "layers": self.chosen, "lam": self.lam, "keep": self.keep,
                "requery_kl": round(float(self.kl_sum) / seen, 6),
                "answer_changed": round(float(self.changed) / seen, 6),
                "maps": [{"sequence": s, "image_index": i, "grid": grid, "markers": kept,
                          "title": f"CARVE contrast, sequence {s} image {i}"} for s, i, grid, kept in self.maps]}


__all__ = ["CarveAnalysis", "CarveMap", "carve_maps", "contrast", "entropy", "generic_batch",
           "image_attention", "keep_top", "mask_images", "mask_pixels"]
