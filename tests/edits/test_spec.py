"""Edit specs and --probe-arg: a key given twice is refused, naming the key (not silently last-wins)."""

from __future__ import annotations

import pytest

from attnlab.edits import parse_edit_list, parse_edit_spec
from attnlab.errors import ConfigError
from attnlab.params import parse_probe_args


def test_a_repeated_edit_key_is_refused():
    with pytest.raises(ConfigError, match="tau is given twice"):
        parse_edit_spec("temperature:tau=0.9,tau=0.8")
    with pytest.raises(ConfigError, match="tau is given twice"):
        parse_edit_list("head_scale+temperature:tau=0.9,tau=0.8")
    assert parse_edit_spec("temperature:tau=0.9").params()["tau"] == pytest.approx(0.9)


def test_a_repeated_probe_arg_is_refused():
    with pytest.raises(ConfigError, match=r"entropy\.num_bins is given twice"):
        parse_probe_args(["entropy.num_bins=3", "entropy.num_bins=4"])
    with pytest.raises(ConfigError, match=r"entropy\.num_bins is given twice"):
        parse_probe_args(["entropy.num_bins=3", "entropy.num-bins=4"])
    assert parse_probe_args(["entropy.num_bins=3"]) == {"entropy": {"num_bins": 3}}
