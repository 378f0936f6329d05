"""Synthetic scenes and videos of the DiT lab: coloured shapes on a white background, drawn with PIL.

- Image scene (:func:`draw_image_scene`): one object (a shape in a colour, random centre and size) or, with
  ``objects=2``, two objects that do not touch. Caption ``"a red circle"`` / ``"the red circle"`` /
  ``"a red circle and a blue square"``.
- Video (:func:`draw_video`): one object moving in a straight line at constant velocity (left, right, up or down,
  ``0.75 … 1.25`` px per frame). The start and the velocity are drawn for :data:`HORIZON` frames, independently of the
  number of frames asked for, so ``frames=8`` of a video extends ``frames=4`` of the same generator state (the
  extrapolation tests compare both). Caption ``"a red circle moving right"``.

Images are ``SIZE × SIZE`` RGB uint8; videos ``(frames, SIZE, SIZE, 3)``. Every object also comes with its
foreground mask (bool, ``SIZE × SIZE``): exactly the pixels drawn in its colour (PIL draws without
anti-aliasing, and objects never overlap), so probes and guidance can score foreground against background.
A scene is a pure function of the generator that draws it; the lab draws batch ``step`` of a split with
:func:`attnlab.lab.tasks.base.batch_rng`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnlab.errors import ConfigError

__all__ = ["BACKGROUND", "COLOURS", "DIRECTIONS", "HORIZON", "SHAPES", "SIZE", "SPECIALS", "STOP_WORDS", "Drawn",
           "SceneObject", "caption_of", "draw_image_scene", "draw_video", "render", "vocabulary"]

SIZE = 32
"""Image side in pixels."""
HORIZON = 16
"""Frames over which a video's object stays inside the image (the most frames :func:`draw_video` draws)."""
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (230, 200, 30)}
"""Colour name → RGB; each far from white and from the others."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                              "down": (0.0, 1.0)}
"""Direction word → unit (dx, dy) in image coordinates (y grows downwards)."""
BACKGROUND = (255, 255, 255)
SPECIALS: tuple[str, ...] = ("<pad>", "<null>")
"""Token 0 pads a caption to its fixed length; token 1 is the empty caption (classifier-free guidance)."""
STOP_WORDS: tuple[str, ...] = ("a", "the", "and", "moving")


def vocabulary() -> tuple[str, ...]:
    """Every token in id order: :data:`SPECIALS`, :data:`STOP_WORDS`, colours, shapes, directions."""
    return (*SPECIALS, *STOP_WORDS, *COLOURS, *SHAPES, *DIRECTIONS)


@dataclass(frozen=True)
class SceneObject:
    """One object: shape and colour names, centre ``(x, y)`` in pixels at frame 0, half-size ``radius`` in pixels
    and velocity ``(dx, dy)`` in pixels per frame (zero for images)."""

    shape: str
    colour: str
    x: float
    y: float
    radius: float
    dx: float = 0.0
    dy: float = 0.0

    def at(self, frame: int) -> SceneObject:
        """The object moved to ``frame``."""
        return SceneObject(self.shape, self.colour, self.x + frame * self.dx, self.y + frame * self.dy,
                           self.radius, self.dx, self.dy)


@dataclass(frozen=True)
class Drawn:
    """A drawn scene or video.

    Attributes:
        image: (SIZE, SIZE, 3) uint8, or (frames, SIZE, SIZE, 3) uint8 for a video.
        masks: (objects, SIZE, SIZE) bool, or (objects, frames, SIZE, SIZE) bool: each object's drawn pixels.
        caption: the caption's words. objects: the objects (video objects at frame 0).
    """

    image: np.ndarray
    masks: np.ndarray
    caption: tuple[str, ...]
    objects: tuple[SceneObject, ...]


def caption_of(objects: tuple[SceneObject, ...], *, article: str = "a", direction: str | None = None
               ) -> tuple[str, ...]:
    """``article colour shape`` per object joined by ``and`` (the second article is always ``a``); a video adds
    ``moving direction``."""
    words: list[str] = []
    for index, obj in enumerate(objects):
        words += (["and", "a"] if index else [article]) + [obj.colour, obj.shape]
    if direction is not None:
        words += ["moving", direction]
    return tuple(words)


def _choice(rng: np.random.Generator, names: tuple[str, ...] | list[str]) -> str:
    return names[int(rng.integers(len(names)))]


def draw_image_scene(rng: np.random.Generator, *, objects: int = 1) -> Drawn:
    """One image scene: ``objects`` (1 or 2) objects of uniform shape and colour (two objects differ in at least one
    of them), radius uniform in 5 … 10 px (one object) or 4 … 7 px (two), centres uniform where the object fits,
    two objects' bounding circles (radius·√2) at least 2 px apart (a failed
    placement draws the second object again, and every tenth failure both); article ``a`` or ``the`` (one object)
    uniformly.

    Raises ConfigError for ``objects`` not 1 or 2."""
    if objects not in (1, 2):
        raise ConfigError(f"expected objects 1 or 2, got {objects!r}")
    low, high = (5.0, 10.0) if objects == 1 else (4.0, 7.0)
    placed: list[SceneObject] = []
    tries = 0
    while len(placed) < objects:
        radius = float(rng.uniform(low, high))
        x, y = (float(v) for v in rng.uniform(radius, SIZE - 1 - radius, size=2))
        obj = SceneObject(_choice(rng, SHAPES), _choice(rng, list(COLOURS)), x, y, radius)
        if placed and ((obj.shape, obj.colour) == (placed[0].shape, placed[0].colour)
                       or _distance(obj, placed[0]) < (obj.radius + placed[0].radius) * 2 ** 0.5 + 2):
            tries += 1
            if tries % 10 == 0:  # the first object may leave no room (a large one in the middle): start again
                placed.clear()
            continue
        placed.append(obj)
    article = _choice(rng, ("a", "the")) if objects == 1 else "a"
    image, masks = render(tuple(placed))
    return Drawn(image, masks, caption_of(tuple(placed), article=article), tuple(placed))


def _distance(a: SceneObject, b: SceneObject) -> float:
    """Distance between two objects' centres in pixels."""
    return float(np.hypot(a.x - b.x, a.y - b.y))


def draw_video(rng: np.random.Generator, *, frames: int = 4) -> Drawn:
    """One video of ``frames`` frames: radius uniform in 3.5 … 5 px, a direction uniform among :data:`DIRECTIONS`,
    speed uniform in 0.75 … 1.25 px per frame, the start uniform where the object stays inside for
    :data:`HORIZON` frames (so the same generator state gives the same motion for any ``frames``).

    Returns a :class:`Drawn` with ``image`` (frames, SIZE, SIZE, 3) and ``masks`` (1, frames, SIZE, SIZE).
    Raises ConfigError for ``frames`` outside 1 … HORIZON."""
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or not 1 <= frames <= HORIZON:
        raise ConfigError(f"expected frames in 1 … {HORIZON}, got {frames!r}")
    shape, colour = _choice(rng, SHAPES), _choice(rng, list(COLOURS))
    radius = float(rng.uniform(3.5, 5.0))
    direction = _choice(rng, tuple(DIRECTIONS))
    speed = float(rng.uniform(0.75, 1.25))
    ux, uy = DIRECTIONS[direction]
    travel = speed * (HORIZON - 1)
    along = float(rng.uniform(radius, SIZE - 1 - radius - travel))  # start on the moving axis, from its origin side
    across = float(rng.uniform(radius, SIZE - 1 - radius))
    start = along if ux + uy > 0 else SIZE - 1 - along
    x, y = (start, across) if ux else (across, start)
    obj = SceneObject(shape, colour, x, y, radius, ux * speed, uy * speed)
    drawn = [render((obj.at(f),)) for f in range(frames)]
    image = np.stack([d[0] for d in drawn])  # (F, S, S, 3)
    masks = np.stack([d[1] for d in drawn], axis=1)  # (1, F, S, S)
    return Drawn(image, masks, caption_of((obj,), article=_choice(rng, ("a", "the")), direction=direction), (obj,))


def render(objects: tuple[SceneObject, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Draw objects (at their ``x, y``) on white: circle = ellipse in the box ``centre ± radius``, square = that
    box, triangle = apex at the top centre of the box. Returns ``(image (SIZE, SIZE, 3) uint8, masks (n, SIZE,
    SIZE) bool)``, each mask drawn with the same PIL call as its object."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    masks = []
    for obj in objects:
        mask = Image.new("L", (SIZE, SIZE), 0)
        for canvas, fill in ((ImageDraw.Draw(image), COLOURS[obj.colour]), (ImageDraw.Draw(mask), 255)):
            box = (obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius)
            if obj.shape == "circle":
                canvas.ellipse(box, fill=fill)
            elif obj.shape == "square":
                canvas.rectangle(box, fill=fill)
            else:
                canvas.polygon([(obj.x, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
        masks.append(np.asarray(mask) > 0)
    masks_array = np.stack(masks) if masks else np.zeros((0, SIZE, SIZE), dtype=bool)
    return np.asarray(image, dtype=np.uint8), masks_array
