"""Report sections as data: what a probe's section in ``report.html`` draws, declared next to the probe's code.

A probe (or analysis) class declares ``sections: ClassVar[tuple[Section, ...]]`` built from seven primitives:

- :class:`Heatmap`: statistics over layer × head (one panel per :class:`Series`), optionally with per-layer bars;
- :class:`LayerCurve`: statistics against the layer (mean over heads and positions, or one line per head);
- :class:`PositionCurve`: statistics against the ``position`` column (a position, distance bin, length, lag ...),
  mean over heads, for all layers together, the rows without a layer, three picked layers or every layer;
- :class:`StepCurve`: statistics against the training step (the ``step`` key that ``attnlab train`` adds to its
  rows), one overall line or one line per layer;
- :class:`Table`: records of an extras list (e.g. the sink probe's extreme tokens) or statistics per position or
  per picked layer;
- :class:`Text`: a paragraph whose ``{fields}`` are filled from the probe's extras and its rows;
- :class:`ImageOverlay`: a grid of values over one input image's tokens (rows × cols), drawn as a translucent heat
  layer on the actual image (found in ``results["inputs"]``), with markers as circles; the grid is given in the
  spec, or read from an extras list of overlay records (one panel per image).

Every primitive is a frozen dataclass with ``to_dict``/``from_dict`` (plain JSON), so a run writes the sections of
the probes it ran into ``results.json`` (``results["sections"] = {probe: [section dicts]}``) and
``attnlab render results.json`` needs only the JSON. The generic renderer is ``attnlab.report.draw``. This module
is pure: it imports neither torch, transformers nor matplotlib, so probe modules can import it.

Placeholders of :class:`Text` and of captions/titles: ``{key}`` is the probe's extras value ``key``;
``{mean.STAT}``, ``{percent.STAT}`` (100 × mean), ``{value.STAT}`` (the first row's value) and ``{count.STAT}``
read the probe's rows. Lists print as ``1–3, 7`` (integers) or ``a, b``, mappings as ``k (v); ...``, missing or
None values as ``—``, floats with 3 significant digits.
"""

from __future__ import annotations

import dataclasses
import functools
import string
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from attnlab.errors import ConfigError

__all__ = ["Column", "Heatmap", "ImageOverlay", "LayerCurve", "Part", "PositionCurve", "Section", "Series", "StepCurve",
           "Table", "Text", "LAYER_CHOICES", "section_specs", "sections_from_dicts"]

LAYER_CHOICES = ("any", "none", "picked", "each")
"""Which rows a curve :class:`Series` reads: ``any`` = every row, averaged into one line; ``none`` = only rows with
an empty layer; ``picked`` = one line for each of the first, middle and last layer; ``each`` = one line per layer."""

FORMATS = ("number", "text", "token", "list", "mapping", "tokens")
"""Cell formats of a :class:`Column`: ``number`` (3 significant digits), ``text``, ``token`` (shown visibly, as in
the tokens section), ``list`` (items joined by ``, ``), ``mapping`` (``k: v`` joined by ``, ``, numbers signed),
``tokens`` (a list of tokens or ``[id, token]`` pairs, shown visibly and joined by spaces)."""


@dataclass(frozen=True)
class Series:
    """One statistic as drawn in a figure: a heatmap panel, a line, or per-layer bars.

    Attributes:
        statistic: the ``statistic`` column of the probe's rows.
        label: panel title (heatmaps) or legend label (curves); ``{layer}``/``{head}`` name the line's layer/head.
        unit: colour-bar label of a heatmap panel, with units (curves put units on the figure's y label).
        position: only rows with this ``position`` (e.g. 0 for the sink score of key 0); None = all rows.
        layers: curves only, one of :data:`LAYER_CHOICES`.
        dashed, color: line style; None picks the palette colour of the line's layer (or of the series).
        vmin, vmax: colour range of a heatmap panel (None = the data's range).
        scale: multiply the values (e.g. 100 for a percentage).
        normalise: divide each line by its maximum (shapes compared on one axis).
    """

    statistic: str
    label: str = ""
    unit: str = ""
    position: int | None = None
    layers: str = "any"
    dashed: bool = False
    color: str | None = None
    vmin: float | None = None
    vmax: float | None = None
    scale: float = 1.0
    normalise: bool = False

    templates: ClassVar[tuple[str, ...]] = ("label", "unit")

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.layers not in LAYER_CHOICES:
            raise ConfigError(f"Series.layers must be one of {', '.join(LAYER_CHOICES)}, got {self.layers!r}")


@dataclass(frozen=True)
class Column:
    """One column of a :class:`Table`: ``key`` is a record key (extras tables) or a statistic (row tables)."""

    key: str
    header: str
    format: str = "number"

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.format not in FORMATS:
            raise ConfigError(f"Column.format must be one of {', '.join(FORMATS)}, got {self.format!r}")


@dataclass(frozen=True)
class Part:
    """Base of the primitives. ``when`` names an extras key or a statistic that must be present for the part to be
    drawn (None = always, when it has data). ``caption`` and ``alt`` describe a figure or table."""

    kind: ClassVar[str] = ""
    templates: ClassVar[tuple[str, ...]] = ("caption", "alt")
    """The fields that are templates (checked for ``{``/``}`` syntax at construction)."""
    when: str | None = field(default=None, kw_only=True)
    caption: str = field(default="", kw_only=True)
    alt: str = field(default="", kw_only=True)

    def __post_init__(self) -> None:
        _check_fields(self)

    def statistics(self) -> tuple[str, ...]:
        """The statistics this part reads (empty for extras tables and text)."""
        return tuple(s.statistic for s in getattr(self, "series", ()))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: ``{"kind": ..., field: value}``; nested series/columns as dicts, tuples as lists."""
        return {"kind": self.kind, **_plain(dataclasses.asdict(self))}


@dataclass(frozen=True)
class Heatmap(Part):
    """Panels side by side over layer (rows) × head (columns), one per series, mean over the chosen positions.

    ``columns="position"`` puts the position column on the x axis instead (mean over heads), e.g. token classes.
    ``side`` draws that statistic per layer (mean over heads) as horizontal bars to the right, titled ``label``,
    x axis ``unit``. ``xlabel`` defaults to the column name.
    """

    kind: ClassVar[str] = "heatmap"
    templates: ClassVar[tuple[str, ...]] = ("caption", "alt", "xlabel")
    series: tuple[Series, ...]
    columns: str = "head"
    xlabel: str = ""
    side: Series | None = None

    def statistics(self) -> tuple[str, ...]:
        return tuple(s.statistic for s in self.series) + ((self.side.statistic,) if self.side else ())


@dataclass(frozen=True)
class LayerCurve(Part):
    """Lines against the layer: each series is the mean over heads and positions per layer, or with
    ``per_head=True`` one line per head (label ``{head}``)."""

    kind: ClassVar[str] = "layer_curve"
    templates: ClassVar[tuple[str, ...]] = ("caption", "alt", "title", "ylabel")
    series: tuple[Series, ...]
    title: str = ""
    ylabel: str = ""
    logy: bool = False
    ylim: tuple[float, float] | None = None
    per_head: bool = False


@dataclass(frozen=True)
class PositionCurve(Part):
    """Lines against the ``position`` column (position, distance bin, length, lag ...), mean over heads; each
    series picks its layers (:data:`LAYER_CHOICES`)."""

    kind: ClassVar[str] = "position_curve"
    templates: ClassVar[tuple[str, ...]] = ("caption", "alt", "title", "xlabel", "ylabel")
    series: tuple[Series, ...]
    title: str = ""
    xlabel: str = "position"
    ylabel: str = ""
    logx: bool = False
    logy: bool = False
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class StepCurve(Part):
    """Lines against the training step: the rows' ``step`` key (rows without one are skipped).

    Each series is, at every step, the mean of its rows over heads and positions, for the rows its ``layers``
    picks (:data:`LAYER_CHOICES`): ``any`` one overall line over every row, ``none`` one line over the rows with an
    empty layer (an overall statistic such as the loss), ``picked``/``each`` one line per layer (label
    ``{layer}``). ``logy`` draws the y axis on a log scale (non-positive values dropped).
    """

    kind: ClassVar[str] = "step_curve"
    templates: ClassVar[tuple[str, ...]] = ("caption", "alt", "title", "xlabel", "ylabel")
    series: tuple[Series, ...]
    title: str = ""
    xlabel: str = "step"
    ylabel: str = ""
    logy: bool = False
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class Table(Part):
    """A table with a heading ``title`` (optional).

    With ``extras`` set, one row per record of that extras list (sorted by ``sort_by`` descending, at most ``top``),
    cells from the records' ``Column.key``. Without, one row per ``index``: ``"position"`` (each position of the
    statistics) or ``"picked_layers"`` (first, middle and last layer, then all layers; cells are means over heads),
    cells from the statistics named by ``Column.key``. ``empty`` is shown instead of an empty table (nothing if
    ""). ``{shown}`` and ``{total}`` in the caption count the records. ``present_only`` drops the columns whose
    statistic has no rows (statistics tables only).
    """

    kind: ClassVar[str] = "table"
    templates: ClassVar[tuple[str, ...]] = ("caption", "alt", "title", "empty")
    columns: tuple[Column, ...]
    title: str = ""
    extras: str | None = None
    index: str = "position"
    index_header: str = ""
    sort_by: str | None = None
    top: int | None = None
    empty: str = ""
    present_only: bool = False

    def statistics(self) -> tuple[str, ...]:
        return () if self.extras else tuple(c.key for c in self.columns)


@dataclass(frozen=True)
class Text(Part):
    """A paragraph; see the module docstring for the fields ``template`` may use."""

    kind: ClassVar[str] = "text"
    templates: ClassVar[tuple[str, ...]] = ("caption", "alt", "template")
    template: str


@dataclass(frozen=True)
class ImageOverlay(Part):
    """Values over the token grid of one input image, drawn on the image itself.

    Either the spec holds one overlay (``grid`` non-empty) or ``extras`` names a list in the probe's extras whose
    records each hold one: ``{"sequence", "image_index", "grid", "markers"?, "title"?}``; one panel per record, at
    most ``top``. The renderer looks the image up in ``results["inputs"]`` (the entry whose ``"sequence"`` is
    ``sequence``, its ``images[image_index]``), stretches the grid over the whole image as a translucent heat
    layer (nearest-neighbour upsampling: one cell per image token) and circles the ``markers``. Without the image
    file (moved, other machine) the grid is drawn on a grey background and the caption says so.

    Attributes:
        title: panel title (a template). sequence: the global sequence index (``results["inputs"][i]["sequence"]``).
        image_index: the image's number within its sequence (0, 1, …).
        grid: rows × cols values (lists of floats; NaN/None cells are not drawn). markers: ``[row, col]`` cells.
        extras: the extras list of overlay records (then sequence/image_index/grid/markers are unused).
        top: at most this many records drawn (None = every record). label: colour-bar label, with units.
        vmin, vmax: colour range (None = the data's range over the panels drawn).
    """

    kind: ClassVar[str] = "image_overlay"
    templates: ClassVar[tuple[str, ...]] = ("caption", "alt", "title", "label")
    title: str = ""
    sequence: int = 0
    image_index: int = 0
    grid: tuple[tuple[float | None, ...], ...] = ()
    markers: tuple[tuple[int, int], ...] = ()
    extras: str | None = None
    top: int | None = 4
    label: str = ""
    vmin: float | None = None
    vmax: float | None = None

    def __post_init__(self) -> None:
        # JSON and callers give lists: store tuples (the fields are typed as tuples, and frozen specs hash)
        if isinstance(self.grid, list) and all(isinstance(row, (list, tuple)) for row in self.grid):
            object.__setattr__(self, "grid", tuple(tuple(row) for row in self.grid))
        if isinstance(self.markers, list) and all(isinstance(cell, (list, tuple)) for cell in self.markers):
            object.__setattr__(self, "markers", tuple(tuple(cell) for cell in self.markers))
        super().__post_init__()
        if len({len(row) for row in self.grid}) > 1:
            raise ConfigError(f"ImageOverlay.grid must be rows of equal length, got lengths "
                              f"{sorted({len(row) for row in self.grid})}")
        if self.top is not None and self.top < 1:
            raise ConfigError(f"ImageOverlay.top must be at least 1 or None, got {self.top}")


PARTS: dict[str, type[Part]] = {cls.kind: cls for cls in (Heatmap, LayerCurve, PositionCurve, StepCurve, Table,
                                                           Text, ImageOverlay)}


@dataclass(frozen=True)
class Section:
    """One ``<section>`` of the report: HTML ``id``, heading ``title`` and its parts in order."""

    id: str
    title: str
    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        _check_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "parts": [part.to_dict() for part in self.parts]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Section:
        """Inverse of :meth:`to_dict`; ConfigError (one line) on any bad spec: an unknown kind or field, a value of
        the wrong type, a template with unbalanced braces."""
        if not isinstance(data, Mapping) or not {"id", "title", "parts"} <= set(data):
            raise ConfigError(f"a report section needs id, title and parts, got {_short(data)}")
        if not isinstance(data["parts"], (list, tuple)):
            raise ConfigError(f"report section {data['id']!r}: parts must be a list, got {_short(data['parts'])}")
        try:
            return cls(str(data["id"]), str(data["title"]), tuple(_part_from_dict(p) for p in data["parts"]))
        except ConfigError as error:
            raise ConfigError(f"report section {data['id']!r}: {_one_line(error)}") from None
        except (TypeError, ValueError) as error:  # anything the checks above missed is still a bad spec
            raise ConfigError(f"report section {data['id']!r}: {type(error).__name__}: {_one_line(error)}") from None


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (the few forms the primitives use; ints count as floats)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(item, args[0]) for item in value)
        return len(value) == len(args) and all(_matches(item, arg) for item, arg in zip(value, args))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return hint is Any or isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(hint))
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} {_type_name(args[0])}"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _check_template(owner: str, text: str) -> None:
    """ConfigError unless ``text`` is a valid ``str.format`` template whose format specs apply to numbers."""
    try:
        for _, name, spec, _ in string.Formatter().parse(text):
            if name is not None and spec:
                _check_spec(spec)
    except ValueError as error:
        raise ConfigError(f"{owner} is not a valid template ({error}): {_short(text)}") from None


def _check_spec(spec: str) -> None:
    for number in (0.5, 1):
        try:
            format(number, spec)
            return
        except (TypeError, ValueError):
            continue
    raise ValueError(f"format spec {spec!r} applies to no number")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _check_fields(obj: Any) -> None:
    """ConfigError (one line) unless every field of the dataclass ``obj`` has its annotated type and every field
    named in ``obj.templates`` is a valid template."""
    cls = type(obj)
    hints = _hints(cls)
    for item in dataclasses.fields(cls):
        value = getattr(obj, item.name)
        if not _matches(value, hints[item.name]):
            raise ConfigError(f"{cls.__name__}.{item.name} must be {_type_name(hints[item.name])}, "
                              f"got {_short(value)}")
    for name in getattr(cls, "templates", ()):
        _check_template(f"{cls.__name__}.{name}", getattr(obj, name))


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _short(data: Any) -> str:
    text = repr(data)
    return text if len(text) <= 80 else text[:77] + "..."


def _part_from_dict(data: Any) -> Part:
    if not isinstance(data, Mapping) or data.get("kind") not in PARTS:
        raise ConfigError(f"a report section part needs kind in {', '.join(PARTS)}, got {_short(data)}")
    cls = PARTS[data["kind"]]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"kind"})
    if unknown:
        raise ConfigError(f"report section part {data['kind']!r} has unknown field(s): {', '.join(unknown)}")
    kwargs = {key: value for key, value in data.items() if key != "kind"}
    try:
        if "series" in kwargs:
            kwargs["series"] = tuple(Series(**s) for s in kwargs["series"])
        if kwargs.get("side") is not None:
            kwargs["side"] = Series(**kwargs["side"])
        if "columns" in kwargs and cls is Table:
            kwargs["columns"] = tuple(Column(**c) for c in kwargs["columns"])
        if isinstance(kwargs.get("ylim"), list):
            kwargs["ylim"] = tuple(kwargs["ylim"])
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"report section part {data['kind']!r}: {error}") from None


def sections_from_dicts(data: Iterable[Mapping[str, Any]]) -> tuple[Section, ...]:
    """Sections read back from ``results["sections"][probe]``."""
    return tuple(Section.from_dict(item) for item in data)


def section_specs(probes: Iterable[Any]) -> dict[str, list[dict[str, Any]]]:
    """``{probe.name: [section dicts]}`` for ``results["sections"]``: the ``sections`` each probe class declares.

    ``probes`` are probe or analysis instances (or classes): :class:`attnlab.probes.base.Probe` and
    :class:`attnlab.analyses.base.Analysis` declare ``sections = ()``, so one that declares none maps to ``[]`` (it
    ran, its rows are in the tables, it draws nothing).
    """
    return {str(p.name): [s.to_dict() for s in p.sections] for p in probes}
