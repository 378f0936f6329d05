"""Probe arguments: ``--probe-arg PROBE.KEY=VALUE`` parsing and building probes with their arguments.

Both live in :mod:`attnlab.params` (one typed coercion for edits, probes and analyses) and are re-exported here.
The run itself is :func:`attnlab.pipeline.run_probes` (``attnlab report`` and ``attnlab probe``).
"""

from __future__ import annotations

from attnlab.params import build_probes, parse_probe_args

__all__ = ["build_probes", "parse_probe_args"]
