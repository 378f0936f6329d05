"""The fg_profile probe on a hand-built self-attention call over patches."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusion.maps_calls import blocks, call_record

from attnlab.errors import ConfigError, ShapeError
from attnlab.probes import PROBES
from attnlab.roles import IMAGE, TEXT


def test_fg_profile_share_and_preference():
    probe = PROBES.get("fg_profile")(foreground=torch.tensor([[True, False], [False, False]]))
    probe.bind(SimpleNamespace(num_layers=2))
    roles = torch.tensor([[IMAGE] * 4])
    probs = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    probs[:, 0, :, 0] = 1.0  # head 0 attends to the foreground patch, head 1 to a background one
    probs[:, 1, :, 3] = 1.0
    call = call_record(roles, roles, layer=1, kind="self")
    probe.begin_call(call)
    for block in blocks(probs, 3):
        probe.update(call, block)
    rows = {(r["statistic"], r["layer"]): r["value"] for r in probe.rows()}
    assert rows[("fg_share", 1)] == pytest.approx(0.5)
    assert rows[("fg_preference", 1)] == pytest.approx(math.log(3))  # logit(1/2) - logit(1/4)
    assert ("fg_share", 0) not in rows


def test_fg_profile_skips_cross_calls_and_checks_the_mask():
    probe = PROBES.get("fg_profile")(foreground=torch.tensor([True, False, False]))
    probe.bind(SimpleNamespace(num_layers=1))
    cross = call_record(torch.tensor([[IMAGE] * 3]), torch.tensor([[TEXT] * 2]), kind="cross")
    probe.begin_call(cross)
    for block in blocks(torch.full((1, 2, 3, 2), 0.5), 2):
        probe.update(cross, block)
    assert probe.rows() == []
    four = torch.tensor([[IMAGE] * 4])
    with pytest.raises(ShapeError, match="4 image keys, the foreground mask 3 patches"):
        probe.begin_call(call_record(four, four))
    with pytest.raises(ConfigError, match="some patches in and some out"):
        PROBES.get("fg_profile")(foreground=torch.ones(4, dtype=torch.bool))
