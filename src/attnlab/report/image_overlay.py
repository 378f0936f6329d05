"""Drawing of :class:`attnlab.report.sections.ImageOverlay`: a token-grid heat layer on the run's input image.

The image comes from ``results["inputs"]`` (written by the pipeline for image-text runs; docs/results.md):
``[{"sequence": i, "prompt": ..., "images": [{"path", "sha256", "width", "height", "fed", "crop"?}],
"spans": [{"image": file index, "tile": t}, ...]}]``. An overlay record's ``image_index`` is the number of the
image *span* (a tile of a split image counts as one); ``spans`` names the file it came from. Without that
mapping, or when it names no recorded file, the grid is drawn on a grey canvas and the caption says so, never
on another file. The file is read with Pillow when it exists (a relative path is taken from the current
directory); when it is missing or unreadable the grid is drawn on a grey canvas of the recorded size and the
caption says which file was not found. A file whose SHA-256 differs from the recorded one is drawn, and the
caption says it changed.

The grid (rows × cols, one cell per image token of the model's grid) is stretched over the part of the picture
the vision tower saw, with nearest-neighbour cells, coloured by value with an opacity that rises with it (the
picture shows through low cells): the whole picture when the processor resized it (LLaVA's "pad", plain
resizing), the recorded crop box (outlined, and named in the caption) when it centre-cropped (``"fed":
"center-crop"``). A tile of a split image is drawn over its whole file (the caption names the tile). Markers are
circles at the cell centres.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle

from attnlab.report.plots import DPI, MAX_WIDTH_IN
from attnlab.report.sections import ImageOverlay

__all__ = ["overlay_records", "draw_overlays", "find_image"]

MAX_PIXELS = 1024
"""Images are shrunk to at most this many pixels on their longer side before drawing (the PNG stays small)."""


def _png(fig: Figure) -> str:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay_records(part: ImageOverlay, extras: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The overlays a part draws: its own grid, or the records of its extras list (at most ``part.top``)."""
    if part.extras is None:
        if not part.grid:
            return []
        return [{"sequence": part.sequence, "image_index": part.image_index, "grid": part.grid,
                 "markers": part.markers, "title": part.title}]
    records = [r for r in extras.get(part.extras) or [] if isinstance(r, Mapping) and r.get("grid")]
    return records[: part.top] if part.top else records


def find_image(inputs: Sequence[Mapping[str, Any]], sequence: int, image_index: int
               ) -> tuple[Mapping[str, Any] | None, str]:
    """``(image record, note)`` for image span ``image_index`` of the input whose ``"sequence"`` is ``sequence``
    (else its position in the list): the span's file is ``images[spans[image_index]["image"]]``. The record is
    None, and the note says why, when that input, its ``spans`` entry or the file it names is missing: the panel
    is then drawn grey, never on another file."""
    for number, item in enumerate(inputs or ()):
        if not isinstance(item, Mapping) or item.get("sequence", number) != sequence:
            continue
        spans, images = item.get("spans"), item.get("images") or []
        if not isinstance(spans, list):
            return None, "no span→file mapping recorded (results.json written before attnlab recorded spans)"
        source = spans[image_index] if 0 <= image_index < len(spans) else None
        file = source.get("image") if isinstance(source, Mapping) else None
        if not isinstance(file, int) or not 0 <= file < len(images) or not isinstance(images[file], Mapping):
            return None, "the span's input file is unknown (spans do not map it to a recorded image)"
        tile = source.get("tile")
        return images[file], (f"tile {tile} of file {file}" if isinstance(tile, int) and tile > 0 else "")
    return None, "no input image recorded"


def _load(record: Mapping[str, Any]) -> tuple[np.ndarray | None, str]:
    """(RGB array or None, note for the caption)."""
    path = Path(str(record.get("path", "")))
    try:
        data = path.read_bytes()
    except OSError:
        return None, f"image not found: {path}"
    note = ""
    if record.get("sha256") and hashlib.sha256(data).hexdigest() != record["sha256"]:
        note = f"{path.name} changed since the run (SHA-256 differs)"
    try:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((MAX_PIXELS, MAX_PIXELS))
            return np.asarray(image), note
    except Exception as error:  # noqa: BLE001 - any unreadable file: draw without it, say why
        return None, f"could not read {path.name} ({type(error).__name__})"


def _fed_note(meta: Mapping[str, Any] | None) -> str:
    """The caption note for an image the processor centre-cropped (``"fed": "center-crop"``)."""
    if meta is None or meta.get("fed") != "center-crop":
        return ""
    if _crop(meta) is None:
        return "centre-cropped by the processor; the grid is stretched over the whole picture"
    return "centre-cropped by the processor; the grid covers the crop (outlined area)"


def _crop(meta: Mapping[str, Any] | None) -> tuple[float, float, float, float] | None:
    box = (meta or {}).get("crop")
    if isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
        return tuple(float(v) for v in box)  # type: ignore[return-value]
    return None


def _box(meta: Mapping[str, Any] | None, width_px: int, height: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) the grid covers, in the drawn picture's pixels: the processor's crop scaled
    from the file's size, else the whole picture."""
    box = _crop(meta)
    if box is None or not (meta or {}).get("width") or not (meta or {}).get("height"):
        return 0.0, 0.0, float(width_px), float(height)
    sx, sy = width_px / float(meta["width"]), height / float(meta["height"])  # type: ignore[index]
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def _grid(values: Any) -> np.ndarray:
    rows = [[math.nan if v is None else float(v) for v in row] for row in values]
    return np.asarray(rows, dtype=float) if rows and rows[0] else np.full((1, 1), math.nan)


def _heat(grid: np.ndarray, cmap: Colormap, norm: Normalize) -> np.ndarray:
    """(rows, cols, 4) RGBA heat layer: the colour map's colour, opacity rising with the value (0.1 at vmin, 0.75
    at vmax), so the picture shows through low cells; NaN cells are transparent."""
    scaled = np.clip(norm(np.nan_to_num(grid, nan=norm.vmin)), 0.0, 1.0)
    rgba = cmap(scaled)
    rgba[..., 3] = np.where(np.isfinite(grid), 0.1 + 0.65 * scaled, 0.0)
    return rgba


def draw_overlays(part: ImageOverlay, extras: Mapping[str, Any], inputs: Sequence[Mapping[str, Any]],
                  fill: Any = str) -> tuple[str, list[str]] | None:
    """One PNG data URI with a panel per overlay of ``part`` and the notes for the caption, or None when there is
    nothing to draw. ``fill(template)`` fills titles and the colour-bar label (the probe's extras and rows)."""
    records = overlay_records(part, extras)
    if not records:
        return None
    grids = [_grid(r["grid"]) for r in records]
    finite = np.concatenate([g[np.isfinite(g)] for g in grids]) if grids else np.zeros(0)
    vmin = part.vmin if part.vmin is not None else (float(finite.min()) if finite.size else 0.0)
    vmax = part.vmax if part.vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if vmax <= vmin:
        vmax = vmin + 1.0
    columns = min(len(records), 4)
    lines = math.ceil(len(records) / columns)
    width = min(MAX_WIDTH_IN, 3.2 * columns + 0.8)
    fig = Figure(figsize=(width, 3.1 * lines + 0.3), layout="constrained")
    axes = fig.subplots(lines, columns, squeeze=False).ravel()
    cmap = matplotlib.colormaps["inferno"]
    norm = Normalize(vmin, vmax)
    notes = []
    for ax, record, grid in zip(axes, records, grids):
        sequence, image_index = int(record.get("sequence", 0)), int(record.get("image_index", 0))
        meta, note = find_image(inputs, sequence, image_index)
        picture, load_note = _load(meta) if meta is not None else (None, "")
        fed = _fed_note(meta)
        for text in (note, load_note, fed):
            if text:
                notes.append(f"sequence {sequence}, image {image_index}: {text}")
        if picture is not None:
            height, width_px = picture.shape[:2]
            ax.imshow(picture, extent=(0, width_px, height, 0), interpolation="bilinear")
        else:
            height = int((meta or {}).get("height") or grid.shape[0] * 16)
            width_px = int((meta or {}).get("width") or grid.shape[1] * 16)
            ax.imshow(np.full((2, 2, 3), 0.85), extent=(0, width_px, height, 0))
        left, top, right, bottom = _box(meta, width_px, height)
        ax.imshow(_heat(grid, cmap, norm), extent=(left, right, bottom, top), interpolation="nearest")
        if _crop(meta) is not None:
            ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="white",
                                   linestyle="--", linewidth=1.0))
        rows, cols = grid.shape
        cell_w, cell_h = (right - left) / cols, (bottom - top) / rows
        for marker in record.get("markers") or ():
            r, c = int(marker[0]), int(marker[1])
            ax.add_patch(Circle((left + (c + 0.5) * cell_w, top + (r + 0.5) * cell_h),
                                radius=0.42 * min(cell_w, cell_h), fill=False, edgecolor="#00e5ff", linewidth=1.4))
        ax.set_xlim(0, width_px)
        ax.set_ylim(height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        title = record.get("title") or f"sequence {sequence}, image {image_index}"
        ax.set_title(fill(str(title)), fontsize=9)
    for ax in axes[len(records):]:
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(norm, cmap), ax=list(axes[: len(records)]), label=fill(part.label), shrink=0.85,
                 pad=0.02)
    return _png(fig), notes
