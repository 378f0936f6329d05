"""--device-map: a model placed across devices by accelerate (CPU and disk offload here) gives the plain load's results.

CPU only: the map puts some decoder layers (and the input embeddings) on "disk" (accelerate disk offload: their
weights are ``meta`` and read on use) and the rest on "cpu". Probe rows, an edit's effect and eval perplexity must
be **bitwise equal** to the plain load (same weights, same kernels, same order of operations on one CPU). A true
second device does not exist here: :func:`test_probe_states_take_statistics_from_another_device` stands one in
with a tensor subclass (:class:`Elsewhere`) that fails whenever a probe adds it to its state unmoved.
"""

from __future__ import annotations

import gc
import json
import tempfile
from types import SimpleNamespace

import pytest
import torch
from cli.helpers import assert_one_line_error, tiny_model_and_text
from typer.testing import CliRunner

from attnlab.capture.device_map import check_map_modules, dispatch, input_device, meta_model
from attnlab.capture.loading import load_model
from attnlab.cli.main import app
from attnlab.config import ModelSpec, RunConfig, parse_device_map
from attnlab.errors import ConfigError, UsageError

LAYERS = 4
OFFLOADED = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
             "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer tiny random Llama folder and a text of its words: ``(folder, text)``."""
    from tiny_models import WORDS, save_model_dir, tiny_llama

    root = tmp_path_factory.mktemp("device-map")
    text = root / "words.txt"
    text.write_text(" ".join(WORDS[(i * 5) % len(WORDS)] for i in range(200)), encoding="utf-8")
    return save_model_dir(root / "model", tiny_llama(layers=LAYERS)), text


def _offloaded(folder, tmp_path):
    return load_model(folder, device_map=OFFLOADED, offload_dir=tmp_path / "offload")


# the map as a setting -------------------------------------------------------------------------------------------
def test_device_map_settings_parse(tmp_path):
    assert parse_device_map(None) is None and parse_device_map(" auto ") == "auto"
    assert parse_device_map('{"": "cpu", "lm_head": 1}') == {"": "cpu", "lm_head": 1}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(OFFLOADED))
    assert parse_device_map(str(path)) == OFFLOADED
    for bad, fragment in [("autoo", "no such file"), ("{nope", "not valid JSON"), ("{}", "holds {}"),
                          ('{"model": "gpu"}', "'model' -> 'gpu'"), ('{"model": -1}', "GPU index"),
                          ('{"model": true}', "GPU index")]:
        with pytest.raises(ConfigError, match=fragment):
            parse_device_map(bad)
    with pytest.raises(ConfigError, match="--device-map and --device cuda cannot be combined"):
        ModelSpec(device_map="auto", device="cuda")
    config = RunConfig(device_map=str(path))
    assert config.load.device_map == str(path) and RunConfig.from_dict(config.to_dict()) == config


def test_a_map_file_is_read_when_the_model_loads_an_inline_map_at_once(tmp_path):
    """A config may be built where the map file is absent (another node); the file is read once, at load."""
    missing = str(tmp_path / "elsewhere.json")
    assert ModelSpec(device_map=missing).device_map == missing
    with pytest.raises(ConfigError, match="no such file"):
        load_model(tmp_path / "no-model", device_map=missing)  # the map is checked before the model is looked for
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelSpec(device_map="{nope")
    with pytest.raises(ConfigError, match="'model' -> 'gpu'"):
        RunConfig(device_map='{"model": "gpu"}')


def test_a_map_must_name_modules_the_model_has_and_cover_every_weight(tiny):
    from transformers import AutoConfig, AutoModelForCausalLM

    empty = meta_model(AutoModelForCausalLM, AutoConfig.from_pretrained(tiny[0]))
    check_map_modules(empty, OFFLOADED)
    check_map_modules(empty, {"": "cpu"})
    with pytest.raises(UsageError, match="names module 'model.layers.7', which LlamaForCausalLM does not have"):
        check_map_modules(empty, {**OFFLOADED, "model.layers.7": "cpu"})
    with pytest.raises(UsageError, match="keys must not nest: \"\" contains 'model.layers.1'"):
        check_map_modules(empty, {"model.layers.1": "disk", "": "cpu"})
    with pytest.raises(UsageError, match="places no device for lm_head.weight"):
        check_map_modules(empty, {k: v for k, v in OFFLOADED.items() if k != "lm_head"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_a_map_naming_a_gpu_is_refused_without_cuda(tiny):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_model(tiny[0], device_map={"": 0})


# loading --------------------------------------------------------------------------------------------------------
def test_offloaded_load_gives_the_plain_logits(tiny, tmp_path):
    plain, mapped = load_model(tiny[0]), _offloaded(tiny[0], tmp_path)
    layers = mapped.model.model.layers
    assert layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded: read from disk on use
    assert mapped.model.get_input_embeddings().weight.device.type == "meta"
    assert layers[0].self_attn.q_proj.weight.device.type == "cpu"
    assert input_device(mapped.model) == torch.device("cpu") and mapped.facts.device == "cpu"
    record = mapped.model_record()
    assert record["device_map"] == OFFLOADED and "device_map" not in plain.model_record()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(mapped.model(ids).logits, plain.model(ids).logits)


def test_auto_map_records_the_one_device_it_resolved_to_and_makes_no_offload_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a temporary offload folder would be made
    monkeypatch.delenv("ATTNLAB_OFFLOAD_DIR", raising=False)
    loaded = load_model(tiny[0], device_map="auto")
    assert loaded.device_map == ({"": 0} if torch.cuda.is_available() else {"": "cpu"})  # the tiny model fits
    assert list(tmp_path.iterdir()) == []  # no "disk" weights: no folder


def test_a_temporary_offload_folder_exists_only_for_disk_weights_and_goes_with_the_model(tiny, tmp_path,
                                                                                          monkeypatch):
    from tiny_models import tiny_llama

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("ATTNLAB_OFFLOAD_DIR", raising=False)
    in_memory = {key: "cpu" if value == "disk" else value for key, value in OFFLOADED.items()}
    loaded = load_model(tiny[0], device_map=in_memory)
    assert list(tmp_path.iterdir()) == [] and loaded.device_map == in_memory
    for place in (lambda: load_model(tiny[0], device_map=OFFLOADED).model,  # from_pretrained (transformers makes it)
                  lambda: dispatch(tiny_llama(layers=LAYERS), OFFLOADED)):  # in memory (dispatch_model writes it)
        model = place()
        folders = list(tmp_path.glob("attnlab-offload-*"))
        assert len(folders) == 1 and folders[0].is_dir()
        del model
        gc.collect()
        assert not folders[0].exists()  # removed with its model, not at exit


@pytest.mark.parametrize("execution, expected", [(torch.device("meta"), torch.device("meta")),
                                                 (1, torch.device("cuda", 1)), ("cuda:1", torch.device("cuda", 1))])
def test_input_device_follows_the_hook_not_the_weights(execution, expected):
    """Under a map, accelerate's hook on the embeddings says where inputs go, whatever device their weights are on
    (CPU here): the hook wins, and its int or string device is read as a torch device."""
    from tiny_models import tiny_llama

    model = tiny_llama()
    assert input_device(model) == torch.device("cpu")  # no hook: the weights' device
    model.get_input_embeddings()._hf_hook = SimpleNamespace(execution_device=execution)
    assert input_device(model) == expected
    del model.get_input_embeddings()._hf_hook
    model._hf_hook = SimpleNamespace(execution_device=execution)  # a hook on the whole model only
    assert input_device(model) == expected


def test_a_model_in_memory_is_dispatched_with_disk_offload(tmp_path):
    """The path of a .gguf file dequantised in memory: accelerate's dispatch_model writes "disk" weights."""
    from tiny_models import tiny_llama

    reference, model = tiny_llama(layers=LAYERS), tiny_llama(layers=LAYERS)
    dispatch(model, OFFLOADED, tmp_path / "offload")
    assert (tmp_path / "offload" / "index.json").is_file() and model.hf_device_map == OFFLOADED
    assert model.model.layers[3].mlp.up_proj.weight.device.type == "meta"
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    with pytest.raises(UsageError, match="names module 'decoder'"):
        dispatch(tiny_llama(), {"decoder": "cpu", "": "cpu"}, tmp_path / "other")


# probes, edits, eval --------------------------------------------------------------------------------------------
def test_probe_rows_edit_and_perplexity_equal_the_plain_load(tiny, tmp_path):
    from attnlab.capture.session import Session
    from attnlab.evaluation.config import EvalConfig
    from attnlab.evaluation.runner import run_eval
    from attnlab.pipeline import run_probes

    folder, text = tiny
    common = {"model": str(folder), "text": str(text), "seq_len": 24, "max_windows": 2, "bos": "never"}
    probes = ("entropy", "sink", "distance", "norms", "massive_activations", "rope_decay")
    results = [run_probes(RunConfig(**common, probes=probes, device_map=device_map))
               for device_map in (None, OFFLOADED)]
    assert results[0]["rows"] and results[1]["rows"] == results[0]["rows"]  # bitwise: same floats
    assert results[1]["model"]["device_map"] == OFFLOADED and results[1]["patterns"] == results[0]["patterns"]

    edit = "temperature:tau=0.8"
    evals = [run_eval(EvalConfig(**common, variants=(edit,), device_map=device_map))
             for device_map in (None, OFFLOADED)]
    plain, mapped = (result["eval"]["variants"] for result in evals)
    assert [v["perplexity"] for v in mapped] == [v["perplexity"] for v in plain]
    assert plain[1]["perplexity"] != plain[0]["perplexity"]  # the edit acts

    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    logits = []
    for loaded in (load_model(folder), _offloaded(folder, tmp_path)):
        with Session(loaded.model, edits=[edit]) as session, torch.no_grad():
            logits.append(loaded.model(ids).logits)
        report = session.edit_report()
        assert int(report["calls_touched"].sum()) == LAYERS and float(report["max_change"].max()) > 0
    assert torch.equal(logits[0], logits[1])


def test_gradients_of_offloaded_weights_are_refused_not_zero(tiny, tmp_path):
    """inflection's param_grad_norm would silently be 0 for a block whose weights are offloaded (on meta)."""
    from attnlab.pipeline import run_probes

    folder, text = tiny
    common = {"model": str(folder), "text": str(text), "seq_len": 16, "max_windows": 1, "bos": "never",
              "probes": ("inflection",), "pattern_heads": "none"}
    with pytest.raises(ConfigError, match="parameter gradients need every weight in memory"):
        run_probes(RunConfig(**common, device_map=OFFLOADED))
    in_memory = {key: "cpu" if value == "disk" else value for key, value in OFFLOADED.items()}
    results = [run_probes(RunConfig(**common, device_map=device_map)) for device_map in (None, in_memory)]
    assert results[0]["rows"] and results[1]["rows"] == results[0]["rows"]
    assert results[1]["model"]["device_map"] == in_memory  # one device: not dispatched, the map as given


# CLI ------------------------------------------------------------------------------------------------------------
def test_cli_report_with_a_device_map_file(tmp_path):
    folder, text = tiny_model_and_text(tmp_path)
    mapping = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "disk",
               "model.rotary_emb": "cpu", "lm_head": "cpu"}
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(mapping))
    outputs = []
    for name, extra in (("plain", []), ("mapped", ["--device-map", str(map_file)])):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["report", "--model", str(folder), "--text", str(text), "--seq-len", "16",
                                          "--max-windows", "2", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads((out / "results.json").read_text()))
    assert outputs[1]["config"]["device_map"] == str(map_file)
    assert outputs[1]["model"]["device_map"] == mapping and outputs[1]["rows"] == outputs[0]["rows"]
    lines = []
    for name, extra in (("eval-plain", []), ("eval-mapped", ["--device-map", json.dumps(mapping)])):
        result = CliRunner().invoke(app, ["eval", "--model", str(folder), "--text", str(text), "--seq-len", "16",
                                          "--max-windows", "2", "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        lines.append([line for line in result.stdout.splitlines() if "perplexity" in line])
    assert lines[0] and lines[1] == lines[0]


@pytest.mark.parametrize("device_map, fragment", [
    ("everywhere", "expected device_map auto, balanced"),
    ("{not json", "not valid JSON"),
    ('{"model.layers.9": "cpu", "": "cpu"}', "names module 'model.layers.9'"),
    ('{"model.layers.0": "cpu"}', "places no device for"),
    ('{"model.layers.0": "disk", "": "cpu"}', "keys must not nest"),
])
def test_cli_bad_device_maps_are_one_line_usage_errors(tmp_path, device_map, fragment):
    folder, text = tiny_model_and_text(tmp_path)
    for command in ("report", "eval"):
        result = CliRunner().invoke(app, [command, "--model", str(folder), "--text", str(text), "--seq-len", "16",
                                          "--out", str(tmp_path / command), "--device-map", device_map])
        assert_one_line_error(result, 2, fragment)
        assert not (tmp_path / command / "results.json").exists()


def test_cli_device_map_with_device_is_refused(tmp_path):
    folder, text = tiny_model_and_text(tmp_path)
    for command in ("report", "eval"):
        result = CliRunner().invoke(app, [command, "--model", str(folder), "--text", str(text), "--out",
                                          str(tmp_path / command), "--device-map", "auto", "--device", "cuda"])
        assert_one_line_error(result, 2, "--device-map and --device cuda cannot be combined")


# a statistic from another device ---------------------------------------------------------------------------------
class Elsewhere(torch.Tensor):
    """A CPU tensor standing for one on another device (a GPU holding the layer), for machines without a second one.

    Every result of an op on an Elsewhere tensor is Elsewhere; ``.cpu()`` and ``.to(device)`` bring it home (a
    plain tensor). An op that takes an Elsewhere tensor together with a probe's state tensor (``Elsewhere.states``:
    the storages of ``probe.state()``) raises, as adding a CUDA tensor into a CPU tensor (or indexing one with it)
    does. Ops on temporaries (a buffer made with ``device=probs.device``) are allowed, as on a GPU, and a temporary
    written in place (or through ``out=``) from an Elsewhere tensor becomes Elsewhere itself.
    """

    probes: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten, tree_map_only

        kwargs = kwargs or {}
        leaves = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        away = any(isinstance(x, Elsewhere) for x in leaves)
        home = func is torch.Tensor.cpu or (func is torch.Tensor.to and torch._C._nn._parse_to(
            *args[1:], **kwargs)[0] is not None)
        if away and not home:
            states = {t.untyped_storage().data_ptr() for probe in cls.probes for t in probe.state().values()}
            if any(not isinstance(x, Elsewhere) and x.untyped_storage().data_ptr() in states for x in leaves):
                raise RuntimeError(f"Expected all tensors to be on the same device ({func.__name__}: a probe "
                                   "state took a statistic that was not moved to the state's device)")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if away and not home:  # a buffer written in place or through out= now holds data from the other device
            written = [kwargs.get("out")] + ([args[0]] if func.__name__.endswith("_") or func.__name__.startswith(
                ("__i", "__setitem__")) else [])
            for target in tree_flatten(written)[0]:
                if isinstance(target, torch.Tensor) and not isinstance(target, Elsewhere):
                    target.__class__ = Elsewhere
        if home or not away:
            return tree_map_only(Elsewhere, lambda t: t.as_subclass(torch.Tensor), out) if home else out
        return tree_map_only(torch.Tensor, lambda t: t if isinstance(t, Elsewhere) else t.as_subclass(Elsewhere),
                             out)


def _run_probes(model, probes, monkeypatch=None, probe_kernel="fused"):
    """Run ``probes`` over a batch of two sequences; with ``monkeypatch``, every attention call's query/key/value,
    keep mask and call record, the forward's sequence (ids, masks, positions) and every decoder layer's output are
    Elsewhere (the attention output comes home again, so the rest of the model runs as usual)."""
    import dataclasses

    from attnlab.capture import backend
    from attnlab.capture import session as session_module
    from attnlab.capture.architectures import transformer_blocks
    from attnlab.capture.session import Session

    original = backend.attnlab_attention

    def away(module, query, key, value, attention_mask, **kwargs):
        query, key, value = (t.as_subclass(Elsewhere) for t in (query, key, value))
        output, probs = original(module, query, key, value, attention_mask, **kwargs)
        return output.as_subclass(torch.Tensor), probs

    def hook(kind):
        def retag(module, args, output):
            return (output[0].as_subclass(kind), *output[1:]) if isinstance(output, tuple) else output.as_subclass(kind)
        return retag

    def tagged(value):
        return value.as_subclass(Elsewhere) if isinstance(value, torch.Tensor) else value

    def read_forward(*args, **kwargs):  # the sequence (input ids, masks, positions) lives on the input device
        forward, length = session_module.read_forward.__wrapped__(*args, **kwargs)
        if forward is not None:
            sequence = dataclasses.replace(forward.sequence, **{name: tagged(getattr(forward.sequence, name))
                                                                for name in ("valid", "positions", "input_ids")})
            forward = dataclasses.replace(forward, sequence=sequence)
        return forward, length

    def prepare_call(*args):  # the call record's tensors live on the layer's device
        key, value, attention_mask, keep, call = session_module.prepare_call.__wrapped__(*args)
        names = ("value", "query_valid", "key_valid", "query_positions", "key_positions")
        return key, value, attention_mask, tagged(keep), dataclasses.replace(
            call, **{name: tagged(getattr(call, name)) for name in names})

    blocks = transformer_blocks(model) if monkeypatch is not None else []
    if monkeypatch is not None:
        monkeypatch.setattr(backend, "attnlab_attention", away)
        monkeypatch.setattr(Elsewhere, "probes", probes)
        read_forward.__wrapped__, prepare_call.__wrapped__ = session_module.read_forward, session_module.prepare_call
        monkeypatch.setattr(session_module, "read_forward", read_forward)
        monkeypatch.setattr(session_module, "prepare_call", prepare_call)
    handles = [block.register_forward_hook(hook(Elsewhere)) for block in blocks]
    ids = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 4, 5, 6, 7, 8],
                        [1, 9, 3, 12, 4, 13, 5, 14, 6, 15, 7, 3, 4, 5, 6, 7]])
    try:
        with Session(model, probes=probes, probe_kernel=probe_kernel) as session, torch.no_grad():
            handles += [block.register_forward_hook(hook(torch.Tensor)) for block in blocks]
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in handles:
            handle.remove()
    return session


def _every_probe():
    from attnlab.probes import PROBES

    coordinate_decay = PROBES.get("coordinate_decay")(max_distance=4.0)
    coordinate_decay.set_coordinates(torch.arange(32.0).view(2, 16, 1) % 5)
    return [PROBES.get("entropy")(), PROBES.get("sink")(min_queries=2), PROBES.get("distance")(),
            PROBES.get("norms")(), PROBES.get("massive_activations")(), PROBES.get("rope_decay")(),
            PROBES.get("spatial_decay")(grid=(4, 4)), coordinate_decay,
            PROBES.get("magnets")(token_classes={i: i % 3 for i in range(97)}, bos_token_id=1)]


@pytest.mark.parametrize("probe_kernel", ["fused", "blocked"])
def test_probe_states_take_statistics_from_another_device(monkeypatch, probe_kernel):
    """Every probe's update (fused, blocked, per call, per hidden state) moves its statistics to its state's device
    before adding them: the Elsewhere run gives the same rows as a plain run, and no state became Elsewhere."""
    from tiny_models import tiny_llama

    model = tiny_llama(layers=2)
    plain = _run_probes(model, _every_probe(), probe_kernel=probe_kernel).rows()
    elsewhere = _run_probes(model, _every_probe(), monkeypatch, probe_kernel)
    rows = elsewhere.rows()
    assert {row["probe"] for row in rows} == {probe.name for probe in elsewhere.probes}
    assert [{k: v for k, v in row.items() if k != "value"} for row in rows] == [
        {k: v for k, v in row.items() if k != "value"} for row in plain]
    assert [row["value"] for row in rows] == pytest.approx([row["value"] for row in plain], rel=1e-9, abs=1e-15)
    for probe in elsewhere.probes:
        assert not any(isinstance(t, Elsewhere) for t in probe.state().values()), probe.name


@pytest.mark.parametrize("probe_kernel", ["fused", "blocked"])
def test_a_statistic_added_unmoved_is_caught(monkeypatch, probe_kernel):
    """The check above can fail: a probe that adds a statistic without moving it raises under Elsewhere."""
    from attnlab.probes import PROBES
    from tiny_models import tiny_llama

    class Unmoved(PROBES.get("entropy")):
        def _accumulate(self, layer, entropy, num_visible, row_ok):
            self.rows_seen[layer] += row_ok.to(entropy.dtype).sum(dim=(0, 2)).double()  # no .cpu()
            self.entropy_sum[layer] += (entropy * row_ok).sum(dim=(0, 2)).double()

    with pytest.raises(RuntimeError, match="not moved to the state's device"):
        _run_probes(tiny_llama(layers=2), [Unmoved()], monkeypatch, probe_kernel)


def test_a_device_map_is_refused_under_several_processes(monkeypatch):
    from attnlab.capture.device_map import map_devices
    from attnlab.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="2 processes were started"):
        map_devices("auto")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert map_devices("auto") == "auto"
