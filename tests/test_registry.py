"""The extension recipe (attnlab.registry): base-class check, the name set once, one discovery rule, plug-ins."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import types
import warnings

import pytest

from attnlab.errors import RegistryError
from attnlab.registry import Registry

REAL = [("attnlab.probes", "PROBES"), ("attnlab.analyses", "ANALYSES"), ("attnlab.edits", "EDITS"),
        ("attnlab.layers", "LAYERS"), ("attnlab.functional.masks", "MASKS")]


class Base:
    name = ""


BASE = f"{__name__}.Base"  # this module's import name (pytest may import it as tests.test_registry)


class FakeEntryPoint:
    """What importlib.metadata.EntryPoint offers the registry: name, value, dist and load()."""

    def __init__(self, name, obj=None, error=None, dist="plugin-dist"):
        self.name, self.value, self._obj, self._error = name, f"plugin.module:{name}", obj, error
        self.dist = types.SimpleNamespace(name=dist)

    def load(self):
        if self._error is not None:
            raise self._error
        return self._obj


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package ``regpkg`` with one built-in module, an infrastructure module and a private one (both explode)."""
    root = tmp_path / "regpkg"
    root.mkdir()
    (root / "__init__.py").write_text(textwrap.dedent(f"""
        from attnlab.registry import Registry
        THINGS = Registry("thing", base="{BASE}", package=__name__, infrastructure=("base",),
                          group="attnlab.test_things")
    """))
    (root / "alpha.py").write_text(textwrap.dedent(f"""
        from regpkg import THINGS
        from {__name__} import Base

        @THINGS.register("alpha")
        class Alpha(Base):
            '''The alpha thing.'''
    """))
    (root / "base.py").write_text("raise RuntimeError('infrastructure must not be imported')\n")
    (root / "_helpers.py").write_text("raise RuntimeError('private modules must not be imported')\n")
    (root / "sub").mkdir()
    (root / "sub" / "__init__.py").write_text("raise RuntimeError('subpackages must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in [n for n in sys.modules if n == "regpkg" or n.startswith("regpkg.")]:
        del sys.modules[name]


def _entry_points(monkeypatch, group, entries):
    def fake(**kwargs):
        return list(entries) if kwargs.get("group") == group else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def test_register_sets_the_name_and_checks_the_base_class():
    things = Registry("thing", base=BASE)

    @things.register("gamma")
    class Gamma(Base):
        pass

    assert Gamma.name == "gamma" and things.get("gamma") is Gamma
    with pytest.raises(TypeError, match=f"subclass of {BASE}"):
        things.register("other")(int)
    with pytest.raises(TypeError, match="subclass"):
        things.register("fn")(lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        things.register("gamma")(type("Gamma2", (Base,), {}))
    with pytest.raises(TypeError, match="let the decorator name it"):  # one place gives the name
        things.register("delta")(type("Delta", (Base,), {"name": "not_delta"}))


def test_callable_registries_take_functions_not_other_objects():
    factories = Registry("mask")
    factories.register("one")(lambda: 1)
    assert factories.get("one")() == 1
    with pytest.raises(TypeError, match="callable"):
        factories.register("two")(2)


def test_unknown_names_suggest_the_nearest():
    things = Registry("thing", base=BASE)
    things.register("entropy")(type("E", (Base,), {}))
    with pytest.raises(RegistryError, match="Unknown thing 'entropi'. Did you mean: entropy"):
        things.get("entropi")


def test_discovery_imports_public_modules_but_not_infrastructure_private_or_subpackages(package, monkeypatch):
    _entry_points(monkeypatch, "attnlab.test_things", [])
    from regpkg import THINGS

    assert "regpkg.alpha" not in sys.modules  # lazy: nothing imported before the first lookup
    assert THINGS.names() == ["alpha"]
    assert THINGS.get("alpha").name == "alpha"


def test_entry_point_plugins_load_once_and_bad_ones_are_named_and_skipped(package, monkeypatch):
    calls = []

    class Plugin(Base):
        """A third-party thing."""

    entries = [FakeEntryPoint("plugin", Plugin), FakeEntryPoint("alpha", Plugin, dist="shadowing-dist"),
               FakeEntryPoint("broken", error=ImportError("no module named nowhere"), dist="broken-dist"),
               FakeEntryPoint("wrong_kind", int)]

    def fake(**kwargs):
        calls.append(kwargs)
        return entries if kwargs.get("group") == "attnlab.test_things" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    from regpkg import THINGS

    with pytest.warns(UserWarning) as caught:
        names = THINGS.names()
    assert names == ["alpha", "plugin"]
    assert THINGS.get("plugin") is Plugin and Plugin.name == "plugin"
    assert THINGS.get("alpha").__module__ == "regpkg.alpha"  # the built-in wins
    messages = [str(w.message) for w in caught]
    assert any("'alpha'" in m and "shadows the built-in" in m and "shadowing-dist" in m for m in messages)
    assert any("'broken'" in m and "failed to load" in m and "broken-dist" in m and "ImportError" in m
               for m in messages)
    assert any("'wrong_kind'" in m and "failed to load" in m and "TypeError" in m for m in messages)
    THINGS.names()
    assert len(calls) == 1  # discovered once


@pytest.mark.parametrize(("module", "attribute"), REAL)
def test_real_registries_follow_the_recipe(module, attribute):
    registry = getattr(importlib.import_module(module), attribute)
    plural = module.rsplit(".", 1)[-1]
    assert registry.group == f"attnlab.{plural}"
    for name in registry.names():
        entry = registry.get(name)
        registry.check(entry)
        if isinstance(entry, type):
            assert entry.name == name  # set by register(), never by hand


def test_mask_factories_stay_callable_by_name():
    from attnlab.functional.masks import MASKS

    mask_mod = MASKS.get("sliding_window")(window=256)
    assert callable(mask_mod)


def test_no_hand_kept_module_lists_remain():
    import attnlab.probes

    assert not hasattr(attnlab.probes, "_BUILTIN_MODULES")


def test_a_plugin_that_registers_itself_is_not_taken_for_a_built_in(package, monkeypatch):
    """A plug-in module may use the decorator and also declare its entry point; when another registry's plug-in
    loading imports it first, its entry must not be reported as shadowing a built-in."""
    from regpkg import THINGS

    class SelfRegistered(Base):
        """A plug-in class defined outside the registry's package."""

    SelfRegistered.__module__ = "myplugin"
    THINGS.register("self_registered")(SelfRegistered)  # the side effect of importing the plug-in module
    _entry_points(monkeypatch, "attnlab.test_things", [FakeEntryPoint("self_registered", SelfRegistered)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert THINGS.names() == ["alpha", "self_registered"]
    assert THINGS.get("self_registered") is SelfRegistered
