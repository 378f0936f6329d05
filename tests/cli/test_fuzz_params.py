"""Hostile parameter values: every registered edit's and probe's parameters, fed through the CLI's own parsers.

``attnlab eval --edit SPEC`` parses each variant with :func:`attnlab.evaluation.config.parse_variant` and
``attnlab probe --probe-arg P.K=V`` (a probe or an analysis) with :func:`attnlab.params.parse_probe_args` then
:func:`attnlab.params.build_probes`, all before a model loads; the CLI maps a UsageError to exit 2 with its first
line. So the property is: either the value is accepted (and what was built holds no non-finite or denormal
number), or a UsageError with a one-line message comes out. Anything else (TypeError, OverflowError, ...) would be
a traceback with exit 1. The three hostile inputs of issue 10 also run end to end through typer's CliRunner.
"""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from attnlab.analyses import ANALYSES, probe_or_analysis
from attnlab.cli.main import app
from attnlab.edits import EDITS
from attnlab.errors import UsageError
from attnlab.evaluation.config import parse_variant
from attnlab.functional.masks import MASKS
from attnlab.params import accepted_names, build_probes, parse_probe_args
from attnlab.probes import PROBES
from cli.helpers import assert_one_line_error

runner = CliRunner()
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SPECIAL = ["1e400", "-1e400", "1e-320", "-0", "-0.0", "0", "nan", "NaN", "inf", "-inf", "", "1+", "+", "-", "0-",
           "3-1", "1.5", "0x10", "1_000", "٣", "１", "é", "true", "none", "[]", "[0,", "9" * 40, "-" + "9" * 40,
           str(2**31), str(2**63), "0-99999999", "1e308", "2.2e-308", "\n", "a,b", "a=b", " 2 "]
values = st.one_of(
    st.sampled_from(SPECIAL),
    st.text(max_size=12),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.lists(st.integers(-3, 2**33), min_size=1, max_size=4).map(lambda xs: "+".join(map(str, xs))),
)
# every parameter of every registered edit and probe, plus a key none of them takes
EDIT_PARAMS = [(name, param) for name in EDITS.names() for param in [*accepted_names(EDITS.get(name)), "bogus"]]
EDIT_PARAMS.append(("mask:name=sliding_window", "window"))  # a key the mask edit forwards to its factory
# every parameter of every registered mask through ``--edit mask:name=NAME,...``, the others at valid small values
MASK_BASE = {"causal": {}, "full": {}, "sinks": {}, "sink_window": {}, "sliding_window": {"window": 4},
             "ls_heads": {"window": 4, "num_local_heads": 1}, "radial": {"num_frames": 4, "tokens_per_frame": 4},
             "shifted_groups": {"group_size": 4, "num_heads": 4}, "dma": {}, "sparsed": {}, "groups": {}}
MASK_PARAMS = [(name, param) for name in MASKS.names() for param in [*accepted_names(MASKS.get(name)), "bogus"]]
OBSERVERS = [*PROBES.names(), *ANALYSES.names()]  # `--probe NAME` takes a probe or an analysis
PROBE_PARAMS = [(name, param) for name in OBSERVERS for param in [*accepted_names(probe_or_analysis(name)), "bogus"]]


def _numbers(value):
    """Every float inside a parameter value (lists and tuples included)."""
    if isinstance(value, float):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item)


def _assert_sane(params):
    for number in (n for value in params.values() for n in _numbers(value)):
        assert math.isfinite(number) and (number == 0 or abs(number) >= sys.float_info.min), params


def _assert_usage_error(error):
    assert isinstance(error, UsageError), f"{type(error).__name__}: {error}"
    assert str(error).strip() and "\n" not in str(error).strip(), repr(str(error))


def test_the_fuzz_covers_every_edit_and_probe():
    assert {name.split(":")[0] for name, _ in EDIT_PARAMS} == set(EDITS.names())
    assert {name for name, _ in PROBE_PARAMS} == set(OBSERVERS) and ("cka", "max_tokens") in PROBE_PARAMS
    assert ("temperature", "tau") in EDIT_PARAMS and ("redistribution", "sink_positions") in EDIT_PARAMS


@FUZZ
@given(st.sampled_from(EDIT_PARAMS), values)
def test_edit_parameters_are_accepted_sanely_or_refused_in_one_line(target, value):
    name, param = target
    separator = "," if ":" in name else ":"
    try:
        edits = parse_variant(f"{name}{separator}{param}={value}")
    except Exception as error:  # noqa: BLE001 - the property is about which exceptions come out
        _assert_usage_error(error)
        return
    for edit in edits:
        _assert_sane(edit.params())
        _assert_sane({"layers": edit.layers, "heads": edit.heads})


def test_the_mask_fuzz_covers_every_mask():
    assert set(MASK_BASE) == set(MASKS.names()) and {name for name, _ in MASK_PARAMS} == set(MASKS.names())
    assert ("radial", "device") in MASK_PARAMS and ("radial", "num_frames") in MASK_PARAMS
    for name, base in MASK_BASE.items():  # the base values alone are accepted (tensor-built masks need Python)
        spec = ",".join([f"name={name}", *(f"{key}={value}" for key, value in base.items())])
        if not any(kind in name for kind in ("dma", "sparsed", "groups")):
            assert parse_variant(f"mask:{spec}")


@FUZZ
@given(st.sampled_from(MASK_PARAMS), values)
@example(("radial", "num_frames"), "1000000000")  # a 10**9-step table loop: the edit hung before the bound
@example(("radial", "block_size"), "1")  # fine for 16 tokens
@example(("radial", "device"), "gpu")  # RuntimeError from torch before the device was checked
def test_mask_parameters_are_accepted_sanely_or_refused_in_one_line(target, value):
    name, param = target
    arguments = {**MASK_BASE[name], param: value}
    spec = ",".join([f"name={name}", *(f"{key}={item}" for key, item in arguments.items())])
    try:
        edits = parse_variant(f"mask:{spec}")
    except Exception as error:  # noqa: BLE001
        _assert_usage_error(error)
        return
    for edit in edits:
        _assert_sane(edit.params())


@FUZZ
@given(st.sampled_from(PROBE_PARAMS), values)
def test_probe_parameters_are_accepted_sanely_or_refused_in_one_line(target, value):
    name, param = target
    try:
        parsed = parse_probe_args([f"{name}.{param}={value}"])
        probes = build_probes((name,), parsed)
    except Exception as error:  # noqa: BLE001
        _assert_usage_error(error)
        return
    _assert_sane(parsed[name])
    assert len(probes) == 1 and probes[0].name == name


@pytest.mark.parametrize(("args", "fragments"), [
    (["eval", "--edit", "temperature:train_len=1e400"], ["train_len must be an integer", "1e400"]),
    (["eval", "--edit", "temperature:tau=1e-320"], ["tau must be in [1e-06, 1000000.0]", "1e-320"]),
    (["eval", "--edit", "temperature:tau=nan"], ["tau must be a finite number"]),
    (["eval", "--edit", "sink_window:window=" + "9" * 5000], ["window must be an integer"]),
    (["probe", "--probe", "entropy", "--probe-arg", "entropy.num_bins=1.5"], ["num_bins must be an integer", "1.5"]),
    (["probe", "--probe", "entropy", "--probe-arg", "entropy.num_bins=0"], ["num_bins must be in [1, 10000]"]),
])
def test_hostile_inputs_exit_2_with_one_line(tmp_path, args, fragments):
    result = runner.invoke(app, [*args, "--model", str(tmp_path / "never-loaded"), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, 2, *fragments)
    assert not (tmp_path / "out").exists()


HUGE = ["99999999999999999999999", str(2**63), str(2**64), str(2**31), "-1", "0", "-" + "9" * 40]
RUN_OPTIONS = [("probe", "--seq-len"), ("probe", "--max-windows"), ("probe", "--block-size"), ("probe", "--seed"),
               ("eval", "--seq-len"), ("eval", "--max-windows"), ("eval", "--stride"), ("eval", "--passkey-trials"),
               ("eval", "--passkey-lengths"), ("eval", "--seed")]


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize(("command", "option"), RUN_OPTIONS)
def test_run_options_out_of_range_exit_2_with_one_line(tmp_path, command, option, value):
    """Run-level numbers are bounded before a model loads (seed to [0, 2**63 - 1], sizes to 2**31 - 1)."""
    args = [command, *(["--probe", "entropy"] if command == "probe" else ["--task", "passkey"]), option, value]
    result = runner.invoke(app, [*args, "--model", str(tmp_path / "never-loaded"), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, 2)  # out of range: the option's bound; in range: the missing model


@pytest.mark.parametrize(("command", "option", "value", "fragment"), [
    ("probe", "--seed", "99999999999999999999999", "seed must be in [0, 9223372036854775807]"),
    ("eval", "--seed", "99999999999999999999999", "seed must be in [0, 9223372036854775807]"),
    ("probe", "--seed", "-1", "seed must be in [0, "),
    ("probe", "--query-fraction", "1e400", "query_fraction must be in (0, 1]"),
    ("probe", "--query-fraction", "nan", "query_fraction must be in (0, 1]"),
    ("eval", "--passkey-depths", "1e400", "passkey depths must be fractions in [0, 1]"),
    ("eval", "--passkey-lengths", "9" * 40, "passkey lengths must be >= 2 tokens and <= 2147483647"),
])
def test_named_run_option_refusals(tmp_path, command, option, value, fragment):
    args = [command, *(["--probe", "entropy"] if command == "probe" else []), option, value]
    result = runner.invoke(app, [*args, "--model", str(tmp_path / "never-loaded"), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, 2, fragment)


def test_batch_size_from_a_config_file_is_bounded(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"batch_size: {2**64}\n", encoding="utf-8")
    result = runner.invoke(app, ["probe", "--probe", "entropy", "--config", str(config), "--model",
                                 str(tmp_path / "never-loaded"), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, 2, "batch_size must be in [1, 2147483647]")


@pytest.mark.parametrize("device", ["meta", "xla", "cuda:x", "cpu:0:1"])
def test_unsupported_devices_exit_2_with_one_line(tmp_path, device):
    from tiny_models import save_model_dir, tiny_llama, tiny_tokenizer

    folder = save_model_dir(tmp_path / "tiny", tiny_llama(), tiny_tokenizer())
    result = runner.invoke(app, ["probe", "--probe", "entropy", "--model", str(folder), "--device", device,
                                 "--seq-len", "8", "--max-windows", "1", "--out", str(tmp_path / "out")])
    assert_one_line_error(result, 2, "device")
