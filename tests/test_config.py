"""attnlab.config: composed frozen specs, built by field name, flat to_dict that reads back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from attnlab.config import ModelSpec, RunConfig, RunSpec, TextSpec
from attnlab.errors import ConfigError, RegistryError
from attnlab.evaluation.config import EvalConfig, EvalSpec


def test_flat_names_are_routed_to_their_spec():
    config = RunConfig(model="m", dtype="float64", text=Path("a.txt"), seq_len=64, probe=["entropy"],
                       probe_arg=["entropy.num_bins=5"], out=Path("ignored"))
    assert config.load == ModelSpec(model="m", dtype="float64")
    assert config.data == TextSpec(text="a.txt", seq_len=64)
    assert config.run.probes == ("entropy",) and config.run.probe_args == {"entropy": {"num_bins": 5}}
    assert RunConfig(load=config.load, data=config.data, run=config.run) == config


def test_none_means_default_and_to_dict_reads_back():
    config = RunConfig(seq_len=None, probes=None, compare=None)
    assert config == RunConfig() and config.data.seq_len == 512
    assert RunConfig.from_dict(config.to_dict()) == config
    assert set(config.to_dict()) == RunConfig.option_names() - {"probe", "probe_arg"}
    eval_config = EvalConfig(task="next_token", edit=["temperature:tau=0.9"], passkey_depths="0,1", seq_len=32)
    assert eval_config.eval.tasks == ("next_token",) and eval_config.eval.passkey_depths == (0.0, 1.0)
    again = EvalConfig.from_dict(eval_config.to_dict())  # passkey_lengths is saved resolved: (seq_len,)
    assert again.to_dict() == eval_config.to_dict() and again.lengths == eval_config.lengths == (32,)


def test_specs_are_frozen_and_field_names_unique():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().data.seq_len = 3  # type: ignore[misc]
    for composed in (RunConfig, EvalConfig):
        names = [f.name for spec in dataclasses.fields(composed) for f in dataclasses.fields(spec.default_factory)]
        assert len(names) == len(set(names)), names


@pytest.mark.parametrize(("values", "fragment"), [
    ({"colour": "red"}, "unknown setting"),
    ({"seq_len": "512"}, "seq_len must be int"),
    ({"dtype": "fp8"}, "dtype must be one of"),
    ({"query_fraction": 0}, "query_fraction"),
    ({"probe_args": {"cka": {"max_tokens": 8}}}, "not selected"),
    ({"load": "smollm2-135m"}, "load must be a ModelSpec"),
])
def test_bad_values_are_one_line_config_errors(values, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        RunConfig(**values)
    assert "\n" not in str(info.value)


def test_unknown_probe_suggests_from_probes_and_analyses():
    with pytest.raises(RegistryError, match="Did you mean: entropy"):
        RunSpec(probes=("entropi",))
    with pytest.raises(ConfigError, match="--search must be"):
        EvalSpec(search="grid")
