"""A small named registry with did-you-mean errors, one instance per kind (probes, assets, ...)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from attnlab.errors import RegistryError

T = TypeVar("T")


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """One line: ``Unknown probe 'entropi'. Did you mean: entropy? Available: distance, entropy, ...``."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" Did you mean: {close[0]}?" if close else ""
    return f"Unknown {kind} {name!r}.{hint} Available: {', '.join(sorted(known))}"


class Registry(Generic[T]):
    """Maps lowercase snake_case names to objects. Registration is a decorator at the definition site.

    ``loader`` is called once on the first lookup to import the built-in definitions lazily, so importing
    attnlab stays cheap.
    """

    def __init__(self, kind: str, loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader
        self._loaded = loader is None

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            assert self._loader is not None
            self._loader()

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@PROBES.register("entropy")``. Raises ValueError on a duplicate name."""

        def decorate(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        """Return the object named ``name``. Raises RegistryError (a KeyError) naming the nearest known name."""
        self._ensure_loaded()
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(unknown_name_message(self.kind, name, list(self._items))) from None

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
