"""One extension recipe: a named registry with a base-class check, one discovery rule and entry-point plug-ins.

Every kind of component (probes, analyses, edits, layers, masks) has one :class:`Registry` instance, owned by its
package's ``__init__``. Registration is a decorator at the definition site and is the ONE place that gives a class
its name::

    @PROBES.register("entropy")          # checks issubclass(cls, Probe) (TypeError), sets cls.name = "entropy"
    class EntropyProbe(Probe): ...

Discovery (lazy, on the first lookup, so ``import attnlab`` stays cheap):

1. built-ins: every public module (name not starting with ``_``, not a subpackage) of the registry's ``package``
   is imported, except the infrastructure modules it declares (``base``, ``spec``, ...); importing a module runs
   its ``@REGISTRY.register`` decorators. Adding a component never edits a list.
2. plug-ins: entry points of the registry's ``group`` (``attnlab.probes``, ``attnlab.analyses``, ``attnlab.edits``,
   ``attnlab.layers``, ``attnlab.masks``); the entry point's name is the component's name. One that shadows a
   built-in is refused with a warning; one that fails to load (import error, wrong base class) is skipped with a
   warning naming it and its distribution.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import pkgutil
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from attnlab.errors import RegistryError

T = TypeVar("T")


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """One line: ``Unknown probe 'entropi'. Did you mean: entropy? Available: distance, entropy, ...``."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean: {close[0]}?" if close else ""
    return f"Unknown {kind} {name!r}.{hint} Available: {', '.join(sorted(known))}"


def _resolve(path: str) -> Any:
    """``"attnlab.probes.base.Probe"`` → the object (imported on demand, so a registry costs no import)."""
    module, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


class Registry(Generic[T]):
    """Maps lowercase snake_case names to classes (or, with ``base=None``, to callables such as mask factories).

    Args:
        kind: the word used in messages (``"probe"``).
        base: dotted path of the base class every entry must subclass (``"attnlab.probes.base.Probe"``), resolved
            on first use; None = entries are callables (functions), checked with ``callable``.
        package: the package whose public modules hold the built-ins; None = no built-ins to import.
        infrastructure: modules of ``package`` that define no entries (``("base", "spec")``); not imported.
        group: the entry-point group of third-party plug-ins (``"attnlab.probes"``); None = no plug-ins.

    Raises (from :meth:`register`): TypeError for an entry of the wrong kind, ValueError for a name registered
    twice. :meth:`get` raises RegistryError (a KeyError) naming the nearest known name.
    """

    def __init__(self, kind: str, *, base: str | None = None, package: str | None = None,
                 infrastructure: tuple[str, ...] = (), group: str | None = None) -> None:
        self.kind = kind
        self.base = base
        self.package = package
        self.infrastructure = infrastructure
        self.group = group
        self._items: dict[str, T] = {}
        self._loaded = package is None and group is None

    # registration -------------------------------------------------------------------------------------------
    def check(self, obj: Any) -> None:
        """Raise TypeError unless ``obj`` may be registered here (a subclass of ``base``, or a callable)."""
        if self.base is None:
            if not callable(obj):
                raise TypeError(f"a {self.kind} must be callable, got {obj!r}")
            return
        base = _resolve(self.base)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise TypeError(f"a {self.kind} must be a subclass of {base.__module__}.{base.__qualname__}, "
                            f"got {obj!r}")

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@PROBES.register("entropy")``; checks the entry and sets a class's ``name``.

        Raises:
            TypeError: the entry is not a subclass of ``base`` (or not callable), or the class body sets a different
                ``name`` (the decorator is the one place that names it).
            ValueError: ``name`` is already registered to another entry.
        """

        def decorate(obj: T) -> T:
            self.check(obj)
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            if isinstance(obj, type):
                own = vars(obj).get("name")
                if own is not None and own != name:
                    raise TypeError(f"{obj.__qualname__} sets name={own!r} but is registered as {name!r}; "
                                    "let the decorator name it")
                obj.name = name  # type: ignore[attr-defined]
            self._items[name] = obj
            return obj

        return decorate

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register a component of their own). No error if it is absent."""
        self._items.pop(name, None)

    # discovery ----------------------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.package is not None:
            self._import_builtins()
        if self.group is not None:
            self._load_plugins()

    def _import_builtins(self) -> None:
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            if not (module.ispkg or module.name.startswith("_") or module.name in self.infrastructure):
                importlib.import_module(f"{self.package}.{module.name}")

    def _load_plugins(self) -> None:
        # built-ins are the entries defined inside the registry's package; a plug-in module that registered itself
        # with the decorator as a side effect of another registry's plug-in loading is not one
        builtins = {name for name, obj in self._items.items()
                    if getattr(obj, "__module__", "").startswith(self.package + ".")}
        for entry in importlib.metadata.entry_points(group=self.group):
            where = f"{self.group} entry point {entry.name!r} ({entry.value}"
            dist = getattr(getattr(entry, "dist", None), "name", None)
            where += f", from distribution {dist!r})" if dist else ")"
            if entry.name in builtins:
                warnings.warn(f"{where} shadows the built-in {self.kind} {entry.name!r}; ignored", stacklevel=3)
                continue
            try:
                obj = entry.load()
                if self._items.get(entry.name) is not obj:
                    self.register(entry.name)(obj)
            except Exception as error:  # a broken plug-in must not break attnlab; it is skipped, named
                warnings.warn(f"{where} failed to load and is skipped: {type(error).__name__}: {error}",
                              stacklevel=3)

    # lookup -------------------------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        """Return the entry named ``name``. Raises RegistryError (a KeyError) naming the nearest known name."""
        self._ensure_loaded()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise RegistryError(unknown_name_message(self.kind, str(name), list(self._items))) from None

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
