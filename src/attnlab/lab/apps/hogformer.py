"""HOGformer: all-in-one image restoration with HOG-guided self-attention (Wu et al. 2025, arXiv 2504.09377).

The claim tested: attention guided by histograms of oriented gradients (HOG) of the degraded image restores images
under several degradations, with the degradation type unknown to the model, better than the same attention
without HOG guidance. Layer: ``hog_attention`` (:mod:`attnlab.layers.hog_attention`).

**Data** (:class:`RestorationData`). One example is a grey ``S × S`` image (``image_size``, values in [0, 1],
pixel centres at ``(col + 0.5, row + 0.5)``) and one degraded copy. A batch makes these calls on its generator
``rng`` (:meth:`AppData.rng`), in this order:

1. every clean image, one after the other (:func:`render_clean`):
   - a ramp background ``a + b·((x cos θ + y sin θ) / S − 0.5)``: ``a = rng.uniform(0.2, 0.6)``,
     ``b = rng.uniform(-0.3, 0.3)``, ``θ = rng.uniform(0, 2π)``;
   - the shape count ``rng.integers(1, max_shapes + 1)``; then per shape, each painted over the image: its kind
     ``rng.integers(0, 4)`` (rectangle, disc, line, stripes) and grey value ``v = rng.uniform(0, 1)``, then
     - rectangle: ``x0 = rng.integers(0, S − 2)``, ``x1 = rng.integers(x0 + 3, S + 1)``, ``y0``, ``y1`` the
       same (columns x0 … x1 − 1, rows y0 … y1 − 1), filled with v;
     - disc: ``centre = rng.uniform(0, S, 2)``, ``radius = rng.uniform(3, S / 3)``, filled with v;
     - line: ``start = rng.uniform(0, S, 2)``, ``end = rng.uniform(0, S, 2)``, ``w = rng.uniform(1, 2.5)``;
       pixels whose centre lies within w/2 of the segment get v;
     - stripes: a rectangle drawn as above, then ``f = rng.uniform(0.1, 0.3)`` cycles per pixel,
       ``φ = rng.uniform(0, π)``, ``ψ = rng.uniform(0, 2π)``; filled with
       ``0.5 + 0.4 sin(2π f (x cos φ + y sin φ) + ψ)`` (v is drawn and unused);
   - clipped to [0, 1];
2. the degradation of every image: ``rng.integers(0, len(degradations), size=B)``, a position in ``degradations``;
3. each image's degradation, in image order (:func:`degrade`):
   - ``noise``: ``rng.normal(0, noise_sigma, (S, S))`` added to the image;
   - ``blur`` (no draw): Gaussian blur of standard deviation ``blur_sigma``, kernel radius ⌈3σ⌉, reflected
     borders, separable (rows then columns);
   - ``rain`` (:func:`rain_layer`): the direction ``π/2 + rng.uniform(-0.45, 0.45)`` rad from the x axis, shared
     by every streak; the streak count ``rng.integers(⌈rain_streaks/2⌉, rain_streaks + 1)``; per streak
     ``start = rng.uniform(0, S, 2)``, ``length = rng.uniform(6, 14)`` pixels, ``s = rng.uniform(0.3, 0.6)``.
     The rain layer is the pixelwise max of ``s · max(0, 1 − d)`` (d: distance of the pixel centre to the
     streak's segment), added to the image;
   - clipped to [0, 1];
4. the HOG of each degraded image (no draw): ``skimage.feature.hog(image, orientations,
   pixels_per_cell=(p, p), cells_per_block=(1, 1), block_norm="L1", feature_vector=False)`` with
   ``p = patch_size``: one histogram per p × p cell (each pixel's gradient, central differences and 0 on the image
   border, votes its magnitude into the one bin of its unsigned orientation: ``orientations`` bins over 0–180°),
   divided by its L1 norm + 1e-5 (sum 1 on edges, below 1 on faint gradients, 0 on a flat cell), cells in raster
   order = the model's patch tokens.

Batch: ``degraded`` and ``clean`` (B, 1, S, S) float32, ``hog`` (B, T, orientations) float32 with
T = (S / p)², ``degradation`` (B,) int64, the index in :data:`DEGRADATIONS` = (noise, blur, rain) whatever
``degradations`` holds (for the per-degradation metrics only; the model never sees it).

**Model** (:class:`HOGformerNet`): pixel embedding (3×3 conv, ``embed_channels`` maps, GELU) → p × p patches
flattened and projected to C, plus a fixed 2-D sinusoidal position code → ``num_blocks`` pre-norm blocks
(``x + attention(LN(x), guidance=hog)``, ``x + MLP(LN(x))``, GELU, width ``mlp_ratio · C``); every attention is
a ``hog_attention`` site with bidirectional attention over the T patch tokens → LN → a projection back to p × p
patches of ``embed_channels`` maps → 3×3 conv on [those maps, the pixel embedding] → GELU → 3×3 conv to one
channel (zero-initialised) → added to the degraded input (residual restoration, the output starts as the input).

**Variants**: ``hog`` (the paper's mechanism: HOG into the q/k/v input and HOG-ranked box/interleaved groups),
``no_hog`` (the same network without guidance: plain softmax attention over all patches), ``hog_input`` (HOG into
the q/k/v input, no grouping: separates the two parts of the mechanism).

**Loss**: mean absolute error to the clean image (the released code's L1 pixel loss; it adds a Pearson and a HOG
loss, which are not used here). **Metrics**: PSNR = 10 log10(1 / MSE) per image on the output clipped to
[0, 1], averaged over images (``psnr``, the headline) and over the images of each degradation (``psnr_<name>``);
``psnr_in_<name>``: the degraded input's PSNR (the same for every variant).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.masks import full
from attnlab.lab.apps import APPS
from attnlab.lab.apps.base import App, AppData
from attnlab.lab.apps.host import AppBlock, AppConfig, AppModel
from attnlab.layers import LAYERS
from attnlab.params import Range, validated

__all__ = ["DEGRADATIONS", "HOGformerApp", "HOGformerNet", "RestorationData", "degrade", "gaussian_blur",
           "hog_cells", "psnr", "rain_layer", "render_clean"]

Degradation = Literal["noise", "blur", "rain"]
DEGRADATIONS: tuple[str, ...] = ("noise", "blur", "rain")


# -- generator pieces (numpy, float64) -------------------------------------------------------------------------------
def _centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) pixel-centre coordinates, each (S, S): x = column + 0.5, y = row + 0.5."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return x, y


def _segment_distance(x: np.ndarray, y: np.ndarray, start: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Distance of each point (x, y) to the segment start … start + delta."""
    length2 = max(float(delta @ delta), 1e-12)
    t = np.clip(((x - start[0]) * delta[0] + (y - start[1]) * delta[1]) / length2, 0.0, 1.0)
    return np.hypot(x - start[0] - t * delta[0], y - start[1] - t * delta[1])


def _rectangle(rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    x0 = int(rng.integers(0, size - 2))
    x1 = int(rng.integers(x0 + 3, size + 1))
    y0 = int(rng.integers(0, size - 2))
    y1 = int(rng.integers(y0 + 3, size + 1))
    return x0, x1, y0, y1


def render_clean(rng: np.random.Generator, size: int, max_shapes: int = 3) -> np.ndarray:
    """One clean image (S, S) float64 in [0, 1], drawn as step 1 of the module docstring."""
    x, y = _centres(size)
    level, slope, theta = rng.uniform(0.2, 0.6), rng.uniform(-0.3, 0.3), rng.uniform(0.0, 2 * np.pi)
    image = level + slope * ((x * np.cos(theta) + y * np.sin(theta)) / size - 0.5)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind, value = int(rng.integers(0, 4)), rng.uniform(0.0, 1.0)
        if kind == 0:  # rectangle
            x0, x1, y0, y1 = _rectangle(rng, size)
            image[y0:y1, x0:x1] = value
        elif kind == 1:  # disc
            centre, radius = rng.uniform(0.0, size, 2), rng.uniform(3.0, size / 3)
            image[(x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2] = value
        elif kind == 2:  # line
            start, end, width = rng.uniform(0.0, size, 2), rng.uniform(0.0, size, 2), rng.uniform(1.0, 2.5)
            image[_segment_distance(x, y, start, end - start) <= width / 2] = value
        else:  # stripes
            x0, x1, y0, y1 = _rectangle(rng, size)
            freq, phi, psi = rng.uniform(0.1, 0.3), rng.uniform(0.0, np.pi), rng.uniform(0.0, 2 * np.pi)
            stripes = 0.5 + 0.4 * np.sin(2 * np.pi * freq * (x * np.cos(phi) + y * np.sin(phi)) + psi)
            image[y0:y1, x0:x1] = stripes[y0:y1, x0:x1]
    return np.clip(image, 0.0, 1.0)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a (S, S) image: kernel exp(−i²/2σ²)/Σ for |i| ≤ ⌈3σ⌉, reflected borders."""
    radius = math.ceil(3 * sigma)
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    taps /= taps.sum()
    rows, cols = image.shape
    padded = np.pad(image, radius, mode="reflect")
    across = sum(w * padded[:, i:i + cols] for i, w in enumerate(taps))  # (S + 2r, S): rows filtered
    return sum(w * across[i:i + rows, :] for i, w in enumerate(taps))


def rain_layer(rng: np.random.Generator, size: int, max_streaks: int) -> np.ndarray:
    """The additive rain layer (S, S) of step 3 (module docstring): bright streaks sharing one direction."""
    x, y = _centres(size)
    angle = np.pi / 2 + rng.uniform(-0.45, 0.45)
    direction = np.array([np.cos(angle), np.sin(angle)])
    layer = np.zeros((size, size))
    for _ in range(int(rng.integers(-(-max_streaks // 2), max_streaks + 1))):
        start, length, brightness = rng.uniform(0.0, size, 2), rng.uniform(6.0, 14.0), rng.uniform(0.3, 0.6)
        distance = _segment_distance(x, y, start, length * direction)
        layer = np.maximum(layer, brightness * np.clip(1.0 - distance, 0.0, 1.0))
    return layer


def degrade(rng: np.random.Generator, clean: np.ndarray, kind: str, *, noise_sigma: float, blur_sigma: float,
            rain_streaks: int) -> np.ndarray:
    """The degraded copy of one clean (S, S) image, clipped to [0, 1] (step 3 of the module docstring)."""
    if kind == "noise":
        out = clean + rng.normal(0.0, noise_sigma, clean.shape)
    elif kind == "blur":
        out = gaussian_blur(clean, blur_sigma)
    elif kind == "rain":
        out = clean + rain_layer(rng, clean.shape[0], rain_streaks)
    else:
        raise ConfigError(f"expected a degradation among {list(DEGRADATIONS)}, got {kind!r}")
    return np.clip(out, 0.0, 1.0)


def hog_cells(image: np.ndarray, cell: int, orientations: int = 9) -> np.ndarray:
    """(T, orientations) float64: scikit-image's HOG of one (S, S) image, one L1-normalised histogram per cell × cell
    cell (no block overlap), cells in raster order (step 4 of the module docstring)."""
    from skimage.feature import hog

    grid = hog(image, orientations=orientations, pixels_per_cell=(cell, cell), cells_per_block=(1, 1),
               block_norm="L1", feature_vector=False)  # (S/p, S/p, 1, 1, orientations)
    return grid.reshape(-1, orientations)


def psnr(output: Tensor, target: Tensor) -> Tensor:
    """(B,) PSNR in dB of images in [0, 1]: 10 log10(1 / MSE) per image (output clipped to [0, 1] first)."""
    mse = (output.clamp(0.0, 1.0) - target).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


class RestorationData(AppData):
    """Synthetic all-in-one restoration data: clean shapes/lines/ramps/stripes, one unknown degradation each, HOG.

    See the module docstring for the draws. Raises ConfigError for a value out of range, an image_size that
    patch_size does not divide, or a degradation named twice."""

    name = "hogformer"

    @validated
    def __init__(self, image_size: Annotated[int, Range(ge=8, le=256)] = 32,
                 patch_size: Annotated[int, Range(ge=2, le=64)] = 4,
                 degradations: tuple[Degradation, ...] = DEGRADATIONS,
                 noise_sigma: Annotated[float, Range(gt=0.0, le=1.0)] = 0.1,
                 blur_sigma: Annotated[float, Range(ge=0.3, le=5.0)] = 1.2,
                 rain_streaks: Annotated[int, Range(ge=1, le=200)] = 12,
                 max_shapes: Annotated[int, Range(ge=1, le=20)] = 3,
                 orientations: Annotated[int, Range(ge=2, le=36)] = 9,
                 seed: Annotated[int, Range(ge=0)] = 0) -> None:
        if image_size % patch_size:
            raise ConfigError(f"hogformer: image_size={image_size} must be a multiple of patch_size={patch_size}")
        if len(set(degradations)) != len(degradations):
            raise ConfigError(f"hogformer: expected distinct degradations, got {list(degradations)}")
        self.image_size, self.patch_size, self.degradations = image_size, patch_size, tuple(degradations)
        self.noise_sigma, self.blur_sigma, self.rain_streaks = noise_sigma, blur_sigma, rain_streaks
        self.max_shapes, self.orientations, self.seed = max_shapes, orientations, seed

    def sample(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        clean = np.stack([render_clean(rng, self.image_size, self.max_shapes) for _ in range(batch_size)])
        drawn = rng.integers(0, len(self.degradations), size=batch_size)
        names = [self.degradations[k] for k in drawn]
        degraded = np.stack([degrade(rng, image, name, noise_sigma=self.noise_sigma, blur_sigma=self.blur_sigma,
                                     rain_streaks=self.rain_streaks) for image, name in zip(clean, names)])
        hog = np.stack([hog_cells(image, self.patch_size, self.orientations) for image in degraded])
        kinds = np.array([DEGRADATIONS.index(name) for name in names], dtype=np.int64)
        return {"degraded": degraded[:, None], "clean": clean[:, None], "hog": hog, "degradation": kinds}


# -- model ----------------------------------------------------------------------------------------------------------
def grid_positions(rows: int, cols: int, width: int) -> Tensor:
    """(rows·cols, width) fixed 2-D sinusoidal code: width/4 frequencies 10000^(−i/(width/4)) × (sin, cos) × (row,
    col), tokens in raster order. Raises ConfigError unless width is a multiple of 4."""
    if width % 4:
        raise ConfigError(f"hogformer: hidden_size={width} must be a multiple of 4 for the 2-D position code")
    freqs = 10000.0 ** (-torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                          indexing="ij")
    angles = [axis.reshape(-1, 1) * freqs for axis in (r, c)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=-1)


class HOGformerNet(AppModel):
    """The tiny restoration network of the module docstring; ``forward(degraded, hog=None) -> restored``."""

    def __init__(self, config: AppConfig) -> None:
        super().__init__(config)
        args, width = config.model_args, config.hidden_size
        self.patch, channels = int(args["patch_size"]), int(args["embed_channels"])
        self.uses_guidance = config.variant != "no_hog"
        num_groups = 1 if config.variant == "hog_input" else None  # None: num_heads groups
        patch_width = channels * self.patch**2
        self.pixel_embed = nn.Conv2d(1, channels, 3, padding=1)
        self.token_embed = nn.Linear(patch_width, width)
        blocks = []
        for _ in range(int(args["num_blocks"])):  # per block: the layer, then its norms and MLP (as before AppBlock)
            layer = LAYERS.get("hog_attention")(width, config.num_attention_heads,
                                                guidance_dim=int(args["orientations"]), num_groups=num_groups,
                                                mask_mod=full(), rope_base=None)
            blocks.append(AppBlock(self.site(layer), width, float(args["mlp_ratio"])))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.LayerNorm(width)
        self.token_out = nn.Linear(width, patch_width)
        self.pixel_out = nn.Sequential(nn.Conv2d(2 * channels, channels, 3, padding=1), nn.GELU(),
                                       nn.Conv2d(channels, 1, 3, padding=1))
        nn.init.zeros_(self.pixel_out[2].weight)
        nn.init.zeros_(self.pixel_out[2].bias)
        self.finish_sites()

    def forward(self, degraded: Tensor, hog: Tensor | None = None) -> Tensor:
        """degraded (B, 1, S, S) in [0, 1]; hog (B, T, G) with T = (S/p)² (ignored by ``no_hog``).
        Returns the restored image (B, 1, S, S) (unclipped). Raises ShapeError for other shapes."""
        if degraded.dim() != 4 or degraded.shape[1] != 1 or degraded.shape[2] % self.patch \
                or degraded.shape[3] % self.patch:
            raise ShapeError(f"expected degraded (batch, 1, S, S) with S a multiple of patch_size={self.patch}, got "
                             f"{tuple(degraded.shape)}")
        rows, cols = degraded.shape[2] // self.patch, degraded.shape[3] // self.patch
        guidance = hog if self.uses_guidance else None
        if guidance is not None and tuple(guidance.shape[:2]) != (degraded.shape[0], rows * cols):
            raise ShapeError(f"expected hog (batch, {rows * cols}, orientations) for {rows}x{cols} patches of "
                             f"{self.patch} pixels (data and model patch_size must agree), got {tuple(guidance.shape)}")
        pixels = F.gelu(self.pixel_embed(degraded))  # (B, E, S, S)
        patches = F.unfold(pixels, self.patch, stride=self.patch).transpose(1, 2)  # (B, T, E·p²)
        x = self.token_embed(patches) + grid_positions(rows, cols, self.config.hidden_size).to(pixels)  # (B, T, C)
        for block in self.blocks:
            x = block(x, guidance=guidance)  # (B, T, C)
        patches = self.token_out(self.final_norm(x)).transpose(1, 2)  # (B, E·p², T)
        maps = F.fold(patches, degraded.shape[2:], self.patch, stride=self.patch)  # (B, E, S, S)
        return degraded + self.pixel_out(torch.cat([maps, pixels], dim=1))


@APPS.register("hogformer")
class HOGformerApp(App):
    """HOGformer (Wu et al. 2025): all-in-one restoration of synthetic grey images, with and without HOG guidance.

    Model arguments (``--model-arg``): patch_size (4; shared with the data), embed_channels (8), num_blocks (2
    attention sites), mlp_ratio (2.0), orientations (9; the HOG bins, shared with the data). A shared argument
    (``App.shared_args``) given on either side sets both. See the module
    docstring for the data, model, loss and metrics."""

    layer = "hog_attention"
    data_class = RestorationData
    model_class = HOGformerNet
    variants = {"hog": "HOG into the q/k/v input and HOG-ranked box/interleaved groups (the paper's DHOGSA idea)",
                "no_hog": "the same network without HOG: plain softmax attention over all patches",
                "hog_input": "HOG into the q/k/v input only, no HOG-ranked groups"}
    headline = "psnr"
    higher_is_better = True
    defaults = {"steps": 700, "lr": 3e-3, "batch_size": 32, "eval_every": 350, "eval_batches": 8}
    model_defaults = {"patch_size": 4, "embed_channels": 8, "num_blocks": 2, "mlp_ratio": 2.0, "orientations": 9}
    model_hints = {"patch_size": Annotated[int, Range(ge=2, le=64)],  # patch_size, orientations: as the data's
                   "embed_channels": Annotated[int, Range(ge=1, le=1024)],
                   "num_blocks": Annotated[int, Range(ge=1, le=32)],
                   "mlp_ratio": Annotated[float, Range(gt=0.0, le=64.0)],
                   "orientations": Annotated[int, Range(ge=2, le=36)]}
    shared_args = ("patch_size", "orientations")

    def __init__(self, variant: str | None = None, **kwargs: Any) -> None:
        super().__init__(variant, **kwargs)
        if self.hidden_size % 4:
            raise ConfigError(f"app {self.name}: hidden_size={self.hidden_size} must be a multiple of 4 (2-D "
                              f"position code)")

    def restore(self, model: HOGformerNet, batch: Mapping[str, Tensor]) -> Tensor:
        """The model's output (B, 1, S, S) for a batch (HOG passed; the ``no_hog`` model ignores it)."""
        return model(batch["degraded"], batch["hog"])

    def loss(self, model: HOGformerNet, batch: Mapping[str, Tensor]) -> Tensor:
        return (self.restore(model, batch) - batch["clean"]).abs().mean()

    def metrics(self, model: HOGformerNet, batch: Mapping[str, Tensor]) -> dict[str, tuple[float, float]]:
        out = psnr(self.restore(model, batch), batch["clean"])
        given = psnr(batch["degraded"], batch["clean"])
        result = {"psnr": (float(out.sum()), out.numel())}
        for index, name in enumerate(DEGRADATIONS):
            chosen = batch["degradation"] == index
            if not chosen.any():
                continue
            result[f"psnr_{name}"] = (float(out[chosen].sum()), int(chosen.sum()))
            result[f"psnr_in_{name}"] = (float(given[chosen].sum()), int(chosen.sum()))
        return result
