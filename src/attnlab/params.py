"""Typed, bounded parameters: one coercion for edit specs, ``--probe-arg``, YAML configs and Python calls.

A component's constructor states each parameter's type and bounds in its annotation, and ``@validated`` makes every
call go through :func:`coerce`::

    @validated
    def __init__(self, tau: Annotated[float, Range(ge=1e-6, le=1e6)] = 1.0,
                 variant: Literal["constant", "log_n"] = "constant", layers: IndexList | None = None) -> None:

The edit-spec parser (:mod:`attnlab.edits.spec`) and :func:`parse_probe_args` read the same annotations, so text
from the command line (``tau=0.9``, ``layers=0-3+7``) and typed values from Python or YAML obey one set of rules:

- ``int``: an int (not a bool), an integral float (``2.0``) or ASCII digits with an optional sign; always
  ``|x| <= 2**31 - 1`` (positions, lengths and counts; larger values would overflow index tensors).
- ``float``: a number or text ``float()`` reads (ASCII); always finite, and a non-zero value must be a *normal*
  float (``|x| >= 2.2e-308``): ``1e400`` (inf), ``nan`` and denormals such as ``1e-320`` are refused.
- ``bool``: a bool, or text ``true/false/yes/no/on/off/1/0``. ``str``: text, as given.
- ``Literal[...]``: one of the choices. ``X | None``: None (text ``none``/``null``) or an X.
- :data:`IndexList`: a non-empty set of non-negative ints, returned sorted as a tuple; text joins items with ``+``
  (or ``,``) and allows inclusive ranges: ``0-3+7`` is 0, 1, 2, 3, 7; at most 65,536 indices.
- ``tuple[T, ...]`` / ``list[T]``: an ordered tuple of T (a single T is a one-item tuple); text ``4+8+8``,
  ``4,8,8`` or ``[4, 8, 8]``.
- :class:`Range` bounds an int or float (``ge``/``gt``/``le``/``lt``).
- ``**extra: Annotated[Any, Forward(target)]``: extra keywords belong to another callable (the ``mask`` edit's mask
  factory); ``target(arguments)`` returns it, and its own annotations type them.
- Any other type (a Tensor, a dict) is accepted from Python when ``isinstance`` holds and refused as text.

Every refusal is a :class:`attnlab.errors.ConfigError` with one line naming the owner, the parameter, what was
expected and what was received.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
import operator
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from attnlab.errors import ConfigError, RegistryError

logger = logging.getLogger(__name__)

INT_LIMIT = 2**31 - 1
MAX_INDICES = 2**16
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Range:
    """Bounds of an int or float parameter: ``Annotated[float, Range(gt=0, le=1)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        return not ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt))

    def describe(self, kind: type) -> str:
        fmt = (lambda v: repr(float(v))) if kind is float else (lambda v: str(int(v)))
        low = f"[{fmt(self.ge)}" if self.ge is not None else f"({fmt(self.gt)}" if self.gt is not None else "(-inf"
        high = f"{fmt(self.le)}]" if self.le is not None else f"{fmt(self.lt)})" if self.lt is not None else "inf)"
        return f"in {low}, {high}"


@dataclass(frozen=True)
class Indices:
    """Marker of :data:`IndexList`: a non-empty, sorted set of non-negative ints."""


@dataclass(frozen=True)
class Forward:
    """Marker of a typed ``**kwargs``: ``target(arguments)`` is the callable whose annotations type the extra keys.

    ``what`` names it in messages (``"mask"``): "mask 'sliding_window' does not take size; it takes: window".
    """

    target: Callable[[Mapping[str, Any]], Callable[..., Any]]
    what: str


IndexList = Annotated[tuple[int, ...], Indices()]
"""Layer, head or token indices: ``layers=0-3+7`` → ``(0, 1, 2, 3, 7)``."""

_NONE_TYPE = type(None)


class _Refused(ValueError):
    """Internal: the value does not fit; the message says what was expected (the caller adds who and what)."""


# one value -------------------------------------------------------------------------------------------------
def _split(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(hint) is Annotated:
        base, *meta = typing.get_args(hint)
        inner, more = _split(base)
        return inner, (*more, *meta)
    return hint, ()


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _as_int(value: Any) -> int:
    if isinstance(value, str):
        if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", value, flags=re.ASCII):
            raise _Refused(f"must be an integer, got {value!r}")
        if len(value.strip().lstrip("+-").lstrip("0")) > 12:  # never parse thousands of digits
            raise _Refused(f"must be an integer with |x| <= {INT_LIMIT}, got a {len(value.strip())}-digit number")
        value = int(value)
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    elif not isinstance(value, (bool, int)) and hasattr(value, "__index__"):  # numpy ints, 0-d int tensors
        value = operator.index(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Refused(f"must be an integer, got {value!r}")
    if abs(value) > INT_LIMIT:
        shown = value if abs(value) < 10**30 else "a larger number"
        raise _Refused(f"must be an integer with |x| <= {INT_LIMIT}, got {shown}")
    return value


def _is_scalar_tensor(value: Any) -> bool:
    return hasattr(value, "numel") and hasattr(value, "__float__") and value.numel() == 1


def _as_float(value: Any) -> float:
    if isinstance(value, str):
        if not value.isascii():
            raise _Refused(f"must be a number, got {value!r}")
        try:
            value = float(value)
        except ValueError:
            raise _Refused(f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or _is_scalar_tensor(value)):
        raise _Refused(f"must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:
        raise _Refused("must be a finite number, got an integer too large for a float") from None
    if not math.isfinite(value):
        raise _Refused(f"must be a finite number, got {value}")
    return value


def _as_bool(value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, bool):
        return value
    raise _Refused(f"must be true or false, got {value!r}")


def _text_items(text: str) -> list[str]:
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    return [item.strip() for item in re.split(r"[+,]", body)]


def _as_indices(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        values: set[int] = set()
        for item in _text_items(value):
            match = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", item, flags=re.ASCII)
            if not match:
                raise _Refused(f"must be integers joined by '+' with optional ranges like 0-3, got {value!r}")
            low, high = _as_int(match.group(1)), _as_int(match.group(2) or match.group(1))
            if high < low:
                raise _Refused(f"range {item!r} is empty (expected low-high with low <= high)")
            if high - low + len(values) >= MAX_INDICES:
                raise _Refused(f"lists at most {MAX_INDICES} indices, got {value!r}")
            values.update(range(low, high + 1))
        return tuple(sorted(values))
    items = [value] if isinstance(value, int) else value
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise _Refused(f"must be a list of non-negative integers, got {value!r}")
    result = tuple(sorted({_as_int(v) for v in items}))
    if not result or result[0] < 0:
        raise _Refused(f"must be a non-empty list of non-negative integers, got {value!r}")
    if len(result) > MAX_INDICES:
        raise _Refused(f"lists at most {MAX_INDICES} indices, got {len(result)}")
    return result


def _as_sequence(value: Any, item_hint: Any) -> tuple[Any, ...]:
    if isinstance(value, str):
        items: Iterable[Any] = _text_items(value)
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        items = [value]
    return tuple(_coerce(item, item_hint) for item in items)


def _coerce(value: Any, hint: Any) -> Any:
    hint, meta = _split(hint)
    if any(isinstance(m, Indices) for m in meta):
        return _as_indices(value)
    if _is_union(hint):
        members = typing.get_args(hint)
        if value is None or (_NONE_TYPE in members and isinstance(value, str)
                             and value.strip().lower() in ("none", "null")):
            if _NONE_TYPE in members:
                return None
        first: _Refused | None = None
        for member in (m for m in members if m is not _NONE_TYPE):
            try:
                return _coerce(value, Annotated[(member, *meta)] if meta else member)
            except _Refused as error:
                first = first or error
        raise first or _Refused(f"must not be None, got {value!r}")
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if not any(type(value) is type(choice) and value == choice for choice in choices):
            raise _Refused(f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(hint)
        return _as_sequence(value, args[0] if args else Any)
    if hint is Any or hint is object:
        return value
    if hint is bool:
        return _as_bool(value)
    if hint is int or hint is float:
        number = _as_int(value) if hint is int else _as_float(value)
        for bound in (m for m in meta if isinstance(m, Range)):
            if not bound.contains(number):
                raise _Refused(f"must be {bound.describe(hint)}, got {number}")
        if hint is float and number != 0 and abs(number) < sys.float_info.min:
            raise _Refused(f"must be 0 or a normal float (|x| >= {sys.float_info.min}), got {number}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise _Refused(f"must be text, got {value!r}")
        return value
    check = origin or hint
    if isinstance(check, type) and not isinstance(value, str) and isinstance(value, check):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise _Refused(f"must be a {name} (set it from Python; it cannot be given as text), got {value!r}")


def coerce(value: Any, hint: Any, *, owner: str, param: str) -> Any:
    """``value`` (text or typed) → the value ``hint`` describes. Raises ConfigError ``"{owner}: {param} ..."``."""
    try:
        return _coerce(value, hint)
    except _Refused as error:
        raise ConfigError(f"{owner}: {param} {error}") from None


def coerce_fields(obj: Any, owner: str, special: Mapping[str, Callable[[Any], Any]] | None = None) -> None:
    """Coerce every field of the (frozen) dataclass instance ``obj`` by its annotation, in place, for its
    ``__post_init__`` (the labs' specs and training configs); ``special`` maps field names to their own converters.
    Raises ConfigError ``"{owner}: {field} ..."``."""
    import dataclasses

    hints = typing.get_type_hints(type(obj), include_extras=True)
    for item in dataclasses.fields(obj):
        value = getattr(obj, item.name)
        convert = (special or {}).get(item.name)
        value = convert(value) if convert else coerce(value, hints[item.name], owner=owner, param=item.name)
        object.__setattr__(obj, item.name, value)


# one call ------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    target = inspect.unwrap(func)
    try:
        return typing.get_type_hints(target, include_extras=True)
    except NameError as error:  # a plug-in annotating with names imported only under TYPE_CHECKING
        logger.warning("annotations of %s do not evaluate (%s); its parameters are passed on unchecked",
                       getattr(target, "__qualname__", target), error)
        return {}


def signature_of(func: Callable[..., Any]) -> inspect.Signature:
    """The parameters a class (its ``__init__``; none without one) or a function takes, ``self`` left out."""
    signature = inspect.signature(func)  # follows @validated's __wrapped__
    return signature.replace(parameters=[p for name, p in signature.parameters.items() if name != "self"])


def accepted_names(func: Callable[..., Any]) -> list[str]:
    """Named parameters of ``func`` (``*args``/``**kwargs`` left out), in signature order."""
    return [p.name for p in signature_of(func).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def coerce_arguments(func: Callable[..., Any], values: Mapping[str, Any], *, owner: str) -> dict[str, Any]:
    """Check ``values`` (keyword arguments of ``func``, text or typed) against its annotations.

    Unknown keys are refused (unless ``func`` has a ``**kwargs``: a :class:`Forward` one types them through its
    target, an untyped one passes them on). Defaults are not re-checked.

    Raises:
        ConfigError: an unknown key (the message lists the accepted ones) or a value that does not fit.
    """
    target = func.__init__ if isinstance(func, type) else func
    hints = _hints(target) if inspect.isfunction(inspect.unwrap(target)) else {}
    signature = signature_of(func)
    named = accepted_names(func)
    extra = next((p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    result = {key: coerce(value, hints.get(key, Any), owner=owner, param=key)
              for key, value in values.items() if key in named}
    rest = {key: value for key, value in values.items() if key not in named}
    missing = [p.name for p in signature.parameters.values()
               if p.default is p.empty and p.name in named and p.name not in values]
    if missing:
        raise ConfigError(f"{owner}: needs {', '.join(missing)} (it takes: {', '.join(named)})")
    forward = None if extra is None else next(
        (m for m in _split(hints.get(extra.name, Any))[1] if isinstance(m, Forward)), None)
    if rest and extra is None:
        takes = f"it takes: {', '.join(named)}" if named else "it takes no parameters"
        raise ConfigError(f"{owner}: no parameter {', '.join(sorted(rest))}; {takes}")
    if forward is None:
        return {**result, **rest}
    defaults = {p.name: p.default for p in signature.parameters.values() if p.default is not p.empty}
    try:
        inner = forward.target({**defaults, **result})
    except RegistryError as error:
        raise ConfigError(f"{owner}: {error}") from None
    inner_name = getattr(inner, "name", None) or getattr(inner, "__name__", "?")
    inner_named = accepted_names(inner)
    unknown = sorted(set(rest) - set(inner_named))
    if unknown:
        raise ConfigError(f"{owner}: {forward.what} {inner_name!r} does not take {', '.join(unknown)}; it takes: "
                          f"{', '.join(inner_named) or 'no parameters'}")
    return {**result, **coerce_arguments(inner, rest, owner=f"{owner}: {forward.what} {inner_name!r}")}


def validated(init: Callable[..., None]) -> Callable[..., None]:
    """Decorator of a constructor: coerce and bound-check every argument by its annotation before the body runs.

    Raises ConfigError (see :func:`coerce_arguments`; also for an unknown keyword or a missing argument); the owner
    in messages is the class's registered ``name``.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        owner = getattr(type(self), "name", "") or type(self).__name__
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as error:  # an unknown keyword, a missing argument: the caller's input, in one line
            known = ", ".join(name for name in signature.parameters if name != "self")
            raise ConfigError(f"{owner}: {error}; it takes: {known}") from None
        arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
        extra = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        if extra is not None:
            arguments.update(arguments.pop(extra, {}))
        init(self, **coerce_arguments(init, arguments, owner=owner))

    return wrapper


# --probe-arg -------------------------------------------------------------------------------------------------
def parse_spec(spec: Any, kind: str) -> tuple[str, dict[str, str]]:
    """``"NAME:key=value,..."`` → ``(NAME, {key: text})``: the one reader of edit and mask specs (values stay text;
    :func:`coerce_arguments` types them).

    Raises ConfigError (naming ``kind``) for an empty spec, a part without ``key=value`` or a key given twice.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"expected {kind} spec NAME or NAME:key=value,..., got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    values: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, text = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"{kind} {name!r}: expected key=value, got {part!r} in {spec!r}")
        if key in values:
            raise ConfigError(f"{kind} {name!r}: {key} is given twice in {spec!r}")
        values[key] = text.strip()
    return name, values


def _probe_or_analysis(name: str) -> type:
    from attnlab.analyses import probe_or_analysis  # the registries import this module: look them up late

    return probe_or_analysis(name)


def parse_probe_args(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["cka.max_tokens=512", "spatial_decay.grid=[4,8,8]"]`` → ``{"cka": {"max_tokens": 512}, ...}``, typed.

    Each value is read by the probe constructor's annotation (rules in this module's docstring).

    Raises:
        ConfigError: an item without ``PROBE.KEY=VALUE``, a key given twice, an unknown key or a value that does
            not fit.
        RegistryError: an unknown probe name.
    """
    raw: dict[str, dict[str, str]] = {}
    for item in items or []:
        name, dot, rest = item.partition(".")
        key, equals, text = rest.partition("=")
        if not (dot and equals and name and key):
            raise ConfigError(f"--probe-arg expects PROBE.KEY=VALUE, got {item!r}")
        values = raw.setdefault(name.strip(), {})
        key = key.strip().replace("-", "_")
        if key in values:
            raise ConfigError(f"--probe-arg {name.strip()}.{key} is given twice "
                              f"({values[key]!r} and {text.strip()!r})")
        values[key] = text.strip()
    return {name: probe_arguments(name, values) for name, values in raw.items()}


def probe_arguments(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Coerce one probe's arguments by its constructor's annotations; ConfigError ``bad --probe-arg for NAME: ...``."""
    try:
        return coerce_arguments(_probe_or_analysis(name), values, owner=f"bad --probe-arg for {name}")
    except ConfigError as error:
        message = str(error)
        raise ConfigError(message if message.startswith("bad --probe-arg") else f"bad --probe-arg: {message}") from None


def build_probes(names: tuple[str, ...], probe_args: Mapping[str, Mapping[str, Any]]) -> list[Any]:
    """Instantiate the named probes/analyses with their (text or typed) arguments.

    Raises:
        ConfigError: arguments for a probe not selected, an unknown key or a value that does not fit.
        RegistryError: an unknown name.
    """
    unused = sorted(set(probe_args) - set(names))
    if unused:
        raise ConfigError(f"--probe-arg given for probe(s) not selected: {', '.join(unused)}")
    return [_probe_or_analysis(name)(**probe_arguments(name, probe_args.get(name, {}))) for name in names]


def check_indices(kind: str, values: Any, count: int) -> tuple[int, ...]:
    """Layer or head indices checked against a model: ``values`` (an int, an iterable of ints, or None for all of
    ``0..count-1``) → distinct indices in the given order. Python, numpy and torch integers are accepted
    (``operator.index``); bools are not.

    Raises ConfigError (one line, naming the first bad value): ``"layers must be in 0..N-1, got 40"`` for an index
    out of range, or ``"layers must be an int, a non-empty list of ints or None, got 'x'"``.
    """
    if values is None:
        return tuple(range(count))
    shape = f"{kind} must be an int, a non-empty list of ints or None, got {values!r}"
    if isinstance(values, bool):
        raise ConfigError(shape)
    try:
        items = [operator.index(values)]  # one int (numpy/torch scalars too)
    except TypeError:
        try:
            items = list(values)
        except TypeError:
            raise ConfigError(shape) from None
    if not items or isinstance(values, (str, bytes)) or any(isinstance(item, bool) for item in items):
        raise ConfigError(shape)
    try:
        items = [operator.index(item) for item in items]
    except TypeError:
        raise ConfigError(shape) from None
    for item in items:
        if not 0 <= item < count:
            raise ConfigError(f"{kind} must be in 0..{count - 1}, got {item}")
    return tuple(dict.fromkeys(items))
