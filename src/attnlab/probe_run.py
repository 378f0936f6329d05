"""Probe arguments: ``--probe-arg PROBE.KEY=VALUE`` parsing and building probes with their arguments.

The run itself is :func:`attnlab.pipeline.run_probes` (``attnlab report`` and ``attnlab probe``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attnlab.errors import ConfigError
from attnlab.probes import PROBES
from attnlab.probes.base import Probe


def parse_probe_args(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["cka.max_tokens=512", "spatial_decay.grid=[4,8,8]"]`` → ``{"cka": {"max_tokens": 512}, ...}``.

    Values are read as YAML scalars/lists (``3`` int, ``0.5`` float, ``true`` bool, ``[4, 8]`` list, else str).
    Raises ConfigError on an item without ``probe.key=value``.
    """
    import yaml

    parsed: dict[str, dict[str, Any]] = {}
    for item in items or []:
        name, dot, rest = item.partition(".")
        key, equals, raw = rest.partition("=")
        if not (dot and equals and name and key):
            raise ConfigError(f"--probe-arg expects PROBE.KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.setdefault(name, {})[key.replace("-", "_")] = value
    return parsed


def build_probes(names: tuple[str, ...], probe_args: Mapping[str, Mapping[str, Any]]) -> list[Probe]:
    """Instantiate the named probes with their arguments; ConfigError on arguments a probe does not take."""
    unused = sorted(set(probe_args) - set(names))
    if unused:
        raise ConfigError(f"--probe-arg given for probe(s) not selected: {', '.join(unused)}")
    probes = []
    for name in names:
        cls = PROBES.get(name)
        try:
            probes.append(cls(**dict(probe_args.get(name, {}))))
        except TypeError as error:
            raise ConfigError(f"bad --probe-arg for {name}: {error}") from None
    return probes
