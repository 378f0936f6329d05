"""Synthetic scenes: coloured shapes on a grid, drawn with PIL from a seeded generator.

A scene is a ``grid × grid`` board of cells, each ``cell`` pixels wide; 1 … ``max_objects`` cells hold one object
(a shape in a colour), the others are empty. The image is ``grid · cell`` pixels square, RGB uint8, on a dark
background. With the defaults (3 × 3 cells of 32 px: a 96 × 96 image) and a vision patch of 16 px each cell is
2 × 2 patches, so an object sits on whole image tokens.

A scene is a pure function of the generator that draws it (:func:`draw_scene`); the lab draws batch ``step`` of a
split with :func:`attnlab.lab.tasks.base.batch_rng` (``default_rng(SeedSequence([seed, split_id, step]))``), so the
data depend on (seed, split, step) alone, as the text tasks' do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnlab.errors import ConfigError

__all__ = ["COLOURS", "POSITION_WORDS", "SHAPES", "Scene", "SceneObject", "draw_scene", "render"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
"""Colour name → RGB. Distinct in every channel pattern, so a colour is not confused with brightness alone."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND = (24, 24, 24)
POSITION_WORDS: tuple[str, ...] = ("top-left", "top", "top-right", "left", "center", "right",
                                   "bottom-left", "bottom", "bottom-right")
"""The one-word name of each cell of a 3 × 3 grid, row-major."""


@dataclass(frozen=True)
class SceneObject:
    """One object: its shape and colour names and its cell (row, col), 0-based from the top left."""

    shape: str
    colour: str
    row: int
    col: int


@dataclass(frozen=True)
class Scene:
    """A board: ``objects`` (at distinct cells), the grid side and the cell size in pixels."""

    objects: tuple[SceneObject, ...]
    grid: int = 3
    cell: int = 32

    @property
    def size(self) -> int:
        """Image side in pixels (``grid · cell``)."""
        return self.grid * self.cell

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        """How many objects match the shape and the colour (None matches any)."""
        return sum(1 for o in self.objects if (shape is None or o.shape == shape)
                   and (colour is None or o.colour == colour))

    def image(self) -> np.ndarray:
        """The rendered scene: (size, size, 3) uint8 RGB (:func:`render`)."""
        return render(self)


def draw_scene(rng: np.random.Generator, *, grid: int = 3, cell: int = 32, min_objects: int = 1,
               max_objects: int = 4, colours: Sequence[str] = tuple(COLOURS),
               shapes: Sequence[str] = SHAPES) -> Scene:
    """Draw one scene: a number of objects uniform in [min_objects, max_objects], at distinct cells chosen
    uniformly, each with a uniform shape and colour (repeats allowed, so counts above 1 occur).

    Raises ConfigError for a grid < 1, cell < 8, object counts outside 0 … grid² or min > max, or unknown
    colour/shape names.
    """
    if grid < 1 or cell < 8:
        raise ConfigError(f"expected grid >= 1 and cell >= 8 pixels, got grid={grid}, cell={cell}")
    if not 0 <= min_objects <= max_objects <= grid * grid:
        raise ConfigError(f"expected 0 <= min_objects <= max_objects <= {grid * grid}, got "
                          f"{min_objects} and {max_objects}")
    unknown = [c for c in colours if c not in COLOURS] + [s for s in shapes if s not in SHAPES]
    if unknown or not colours or not shapes:
        raise ConfigError(f"unknown or empty colours/shapes {unknown}; colours: {', '.join(COLOURS)}; "
                          f"shapes: {', '.join(SHAPES)}")
    count = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.permutation(grid * grid)[:count]
    objects = tuple(SceneObject(shape=shapes[int(rng.integers(len(shapes)))],
                                colour=colours[int(rng.integers(len(colours)))],
                                row=int(c) // grid, col=int(c) % grid) for c in sorted(cells))
    return Scene(objects=objects, grid=grid, cell=cell)


def render(scene: Scene) -> np.ndarray:
    """Draw the scene with PIL: each object fills its cell with a 3-pixel margin (circle = inscribed ellipse,
    square = the box, triangle = apex at the top centre). Returns (size, size, 3) uint8 RGB."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    margin = max(1, scene.cell // 10)
    for obj in scene.objects:
        left, top = obj.col * scene.cell + margin, obj.row * scene.cell + margin
        right, bottom = (obj.col + 1) * scene.cell - 1 - margin, (obj.row + 1) * scene.cell - 1 - margin
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return np.asarray(image, dtype=np.uint8)
