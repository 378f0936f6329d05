"""The application machinery (attnlab.lab.apps: base, host, train, results; the `attnlab app` CLI) on a toy app.

The toy app: each example is T random vectors, one of them marked; the target is the marked vector. A model that
attends (one full-attention site reading the mark) can solve it; its loss is the squared error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from attnlab.errors import ConfigError, RegistryError
from attnlab.functional.masks import full
from attnlab.lab.apps import APPS
from attnlab.lab.apps.base import App, AppData
from attnlab.lab.apps.host import AppModel, load_app
from attnlab.lab.apps.train import AppTrainConfig, compare_variants, train_app
from attnlab.layers import LAYERS
from attnlab.params import Range, validated
from typing import Annotated

T, D = 6, 4


class ToyData(AppData):
    name = "toy_test"

    @validated
    def __init__(self, seq_len: Annotated[int, Range(ge=2, le=64)] = T, seed: int = 0) -> None:
        self.seq_len, self.seed = seq_len, seed

    def sample(self, rng, batch_size):
        values = rng.normal(size=(batch_size, self.seq_len, D))
        marked = rng.integers(0, self.seq_len, size=batch_size)
        mark = np.zeros((batch_size, self.seq_len, 1))
        mark[np.arange(batch_size), marked, 0] = 1.0
        return {"inputs": np.concatenate([values, mark], axis=-1), "target": values[np.arange(batch_size), marked],
                "marked": marked}


class ToyModel(AppModel):
    def __init__(self, config):
        super().__init__(config)
        width = config.hidden_size
        self.embed = nn.Linear(D + 1, width)
        self.sites = nn.ModuleList(self.site(LAYERS.get("masked")(width, config.num_attention_heads, mask_mod=full(),
                                                                  rope_base=None))
                                   for _ in range(config.model_args["depth"]))
        self.head = nn.Linear(width, D)
        self.finish_sites()

    def forward(self, inputs):
        hidden = self.embed(inputs)
        for site in self.sites:
            hidden = hidden + site(hidden)
        return self.head(hidden.mean(dim=1))


class ToyApp(App):
    """A toy application (tests only): copy the marked vector."""

    layer = "masked"
    data_class = ToyData
    model_class = ToyModel
    variants = {"deep": "two attention sites", "shallow": "one attention site"}
    headline = "error"
    higher_is_better = False
    defaults = {"steps": 4, "batch_size": 8, "eval_every": 2, "eval_batches": 2, "lr": 1e-2}
    model_defaults = {"depth": 2}
    model_hints = {"depth": Annotated[int, Range(ge=1, le=8)]}

    def __init__(self, variant=None, **kwargs):
        super().__init__(variant, **kwargs)
        if self.variant == "shallow":
            self.model_args["depth"] = 1

    def loss(self, model, batch):
        return ((model(batch["inputs"]) - batch["target"]) ** 2).mean()

    def metrics(self, model, batch):
        error = ((model(batch["inputs"]) - batch["target"]) ** 2).sum(dim=-1)
        return {"error": (float(error.sum()), error.numel())}


@pytest.fixture()
def toy():
    APPS.register("toy_test")(ToyApp)
    yield ToyApp
    APPS.unregister("toy_test")


# -- data --------------------------------------------------------------------------------------------------------
def test_batches_are_pure_in_seed_split_and_step():
    data = ToyData(seed=3)
    first, again = data.batch(2, 4), data.batch(2, 4)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["inputs"], data.batch(2, 4, split="eval")["inputs"])
    assert not torch.equal(first["inputs"], data.batch(3, 4)["inputs"])
    assert first["inputs"].dtype == torch.float32 and first["marked"].dtype == torch.int64
    assert data.describe() == {"name": "toy_test", "seq_len": T, "seed": 3}
    with pytest.raises(ConfigError, match="batch_size"):
        data.batch(0, 0)
    with pytest.raises(ConfigError, match="split"):
        data.batch(0, 2, split="test")
    with pytest.raises(ConfigError, match="seq_len"):
        ToyData(seq_len=1)


def test_a_generator_must_name_itself():
    with pytest.raises(ConfigError, match="AppData subclass Nameless: expected its own name"):
        class Nameless(AppData):
            pass


# -- app and host --------------------------------------------------------------------------------------------------
def test_app_checks_variant_sizes_and_model_args(toy):
    assert toy().variant == "deep" and toy("shallow").model_args == {"depth": 1}
    assert toy(depth="3").model_args == {"depth": 3}  # text is coerced to the default's type
    with pytest.raises(ConfigError, match="expected a variant among deep, shallow, got 'wide'"):
        toy("wide")
    with pytest.raises(ConfigError, match="no model argument width; it takes: depth"):
        toy(width=3)
    with pytest.raises(ConfigError, match="multiple of num_heads"):
        toy(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="depth"):
        toy(depth=0)  # model_hints bound it


def test_sites_are_numbered_and_counted_and_the_model_is_seeded(toy):
    state = torch.random.get_rng_state()
    model = toy().build_model(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    assert [site.layer_idx for site in model.attention_sites] == [0, 1]
    assert model.config.num_hidden_layers == 2 and model.config.head_dim == 8
    again = toy().build_model(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ConfigError, match="4 heads of head_dim 8"):
        model.site(LAYERS.get("masked")(32, 2))


def test_the_site_routes_through_the_interface_without_changing_the_output(toy):
    model = toy().build_model(seed=0).eval()
    batch = ToyData().batch(0, 3)
    with torch.no_grad():
        hooked = model(batch["inputs"])
        for site in model.attention_sites:
            object.__setattr__(site.layer, "attention_hook", None)
        own = model(batch["inputs"])
    torch.testing.assert_close(hooked, own, rtol=1e-5, atol=1e-6)


class CausalModel(AppModel):
    def __init__(self, config):
        super().__init__(config)
        self.mixer = self.site(LAYERS.get("masked")(config.hidden_size, config.num_attention_heads))  # causal default
        self.finish_sites()

    def forward(self, hidden):
        return self.mixer(hidden)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_causal_layer_stays_causal_through_its_site(implementation):
    from attnlab.lab.apps.host import AppConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CausalModel(AppConfig(app="toy_test", hidden_size=16, num_attention_heads=4)).eval()
    model.set_attn_implementation(implementation)
    hidden = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    changed = hidden.clone()
    changed[:, 4:] += 5.0  # change the future of position 3
    with torch.no_grad():
        hooked, later = model(hidden), model(changed)
        object.__setattr__(model.mixer.layer, "attention_hook", None)
        own = model.mixer.layer(hidden)[0]
    assert model.mixer.is_causal
    torch.testing.assert_close(hooked, own, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(later[:, :4], hooked[:, :4], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(later[:, 4:], hooked[:, 4:])


def test_a_session_probes_every_site(toy):
    from attnlab import Session
    from attnlab.capture.patterns import PatternProbe

    model = toy().build_model(seed=0).eval()
    batch = ToyData().batch(0, 2)
    pattern = PatternProbe()
    with torch.no_grad(), Session(model, probes=["entropy", "sink", pattern]) as session:
        model(batch["inputs"])
    rows = session.results()
    assert set(rows[rows.probe == "entropy"].layer.dropna().astype(int)) == {0, 1}
    probs = pattern.patterns(session.attention_paths)[0].probs  # (batch, sites, heads, q, k)
    assert probs.shape == (2, 2, 4, T, T)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 4, T))
    entropy = rows[(rows.probe == "entropy") & (rows.statistic == "entropy")].value
    assert (entropy <= math.log(T) + 1e-5).all()


def test_save_and_load_app_round_trip(toy, tmp_path):
    app = toy("shallow", depth=5)
    model = app.build_model(seed=2).eval()
    model.save_pretrained(tmp_path)
    loaded_app, loaded = load_app(tmp_path)
    assert loaded_app.variant == "shallow" and loaded_app.model_args == {"depth": 1}
    batch = ToyData().batch(0, 2)
    with torch.no_grad():
        assert torch.equal(loaded(batch["inputs"]), model(batch["inputs"]))
    with pytest.raises(ConfigError, match="config.json"):
        load_app(tmp_path / "missing")


def test_a_shared_argument_given_on_either_side_sets_both():
    """hpnet shares window and horizon between its model and its generator (App.shared_args)."""
    from_data = AppTrainConfig(app="hpnet", data_args={"window": "5"})
    assert from_data.model_args == {"window": 5} and from_data.data_args == {"window": 5}
    assert from_data.make_app().model_args["window"] == 5
    from_model = AppTrainConfig(app="hpnet", model_args={"horizon": 4})
    assert from_model.data_args == {"horizon": 4}
    assert AppTrainConfig(app="hpnet", model_args={"window": 4}, data_args={"window": "4"}).data_args["window"] == 4
    with pytest.raises(ConfigError, match="window is given as 5 to the generator and as 4 to the model"):
        AppTrainConfig(app="hpnet", model_args={"window": 4}, data_args={"window": 5})
    app = APPS.get("hpnet")(window=4)
    assert app.data().window == 4 and app.data(window=4).horizon == app.model_args["horizon"] == 8
    with pytest.raises(ConfigError, match="generator's window=5 differs from the model's window=4"):
        app.data(window=5)  # the app's model is fixed: only a config (or the CLI) sets both sides


# -- shared pieces: AppBlock, recording_probs ----------------------------------------------------------------------
class CumulativeSite(nn.Module):
    """A stand-in site: row i of the output is the sum of input rows 0 … i (so it reads the memory rows)."""

    def forward(self, x, scale=1.0):
        return scale * x.cumsum(dim=1)


def test_app_block_is_two_pre_norm_residuals_and_keeps_the_last_rows_after_a_memory():
    from attnlab.lab.apps.host import AppBlock

    torch.manual_seed(0)
    block = AppBlock(CumulativeSite(), 4, 1.5)
    assert [name for name, _ in block.named_children()] == ["site", "norm1", "norm2", "mlp"]
    assert [tuple(m.weight.shape) for m in block.mlp if isinstance(m, nn.Linear)] == [(6, 4), (4, 6)]  # 1.5·4
    h, memory = torch.randn(2, 3, 4), torch.randn(2, 2, 4)
    with torch.no_grad():
        block.mlp[2].weight.zero_()
        block.mlp[2].bias.fill_(0.25)  # the MLP's output is the constant 0.25
        normed = torch.nn.functional.layer_norm(torch.cat([memory, h], dim=1), (4,))  # LayerNorm at its init
        want = h + 2.0 * normed.cumsum(dim=1)[:, 2:] + 0.25  # the site sees the memory; h's 3 rows are kept
        torch.testing.assert_close(block(h, memory, scale=2.0), want)
        alone = h + torch.nn.functional.layer_norm(h, (4,)).cumsum(dim=1) + 0.25
        torch.testing.assert_close(block(h), alone)


def test_recording_probs_switches_recording_on_for_the_block_only():
    from attnlab.lab.apps.host import recording_probs

    layers = [LAYERS.get("tscan")(8, 2, mask_mod=full()) for _ in range(2)]
    layers[1].record_probs = True  # already on: stays on
    hidden = torch.randn(1, 6, 8)
    with torch.no_grad(), recording_probs(layers) as recorded:
        assert recorded == layers
        for layer in layers:
            layer(hidden, grid=(3, 2))
        probs = [layer.last_probs for layer in layers]
    assert all(p.shape == (1, 2, 6, 6) for p in probs)
    torch.testing.assert_close(probs[0].sum(-1), torch.ones(1, 2, 6))
    assert (layers[0].record_probs, layers[0].last_probs) == (False, None)
    assert layers[1].record_probs and layers[1].last_probs is probs[1]
    with pytest.raises(ConfigError, match="record_probs"):
        with recording_probs([LAYERS.get("masked")(8, 2)]):
            pass


# -- training -----------------------------------------------------------------------------------------------------
def test_config_fills_the_apps_defaults_and_refuses_bad_values(toy):
    config = AppTrainConfig(app="toy_test")
    assert (config.steps, config.batch_size, config.eval_every, config.lr) == (4, 8, 2, 1e-2)
    assert AppTrainConfig(app="toy_test", steps="7").steps == 7
    with pytest.raises(RegistryError):
        AppTrainConfig(app="toy_tset")
    with pytest.raises(ConfigError, match="steps"):
        AppTrainConfig(app="toy_test", steps=0)
    with pytest.raises(ConfigError, match="variant"):
        AppTrainConfig(app="toy_test", variant="wide")
    with pytest.raises(RegistryError):
        AppTrainConfig(app="toy_test", probes=("entropi",))
    with pytest.raises(ConfigError, match="unexpected keyword argument 'nosuch'; it takes: seq_len, seed"):
        AppTrainConfig(app="toy_test", data_args={"nosuch": 1})
    with pytest.raises(ConfigError, match="seq_len"):
        AppTrainConfig(app="toy_test", data_args={"seq_len": 1})


def test_every_training_setting_takes_the_apps_default(toy, monkeypatch):
    monkeypatch.setattr(toy, "defaults", {**toy.defaults, "warmup_steps": 2, "optimizer": "sgd", "min_lr_ratio": 0.5})
    config = AppTrainConfig(app="toy_test")
    assert (config.warmup_steps, config.optimizer, config.min_lr_ratio, config.weight_decay) == (2, "sgd", 0.5, 0.01)
    assert AppTrainConfig(app="toy_test", optimizer="adamw").optimizer == "adamw"  # given beats the app's default
    monkeypatch.setattr(toy, "defaults", {"grad_clipping": 1.0})
    with pytest.raises(ConfigError, match="not grad_clipping"):
        AppTrainConfig(app="toy_test")


def test_train_app_logs_evaluates_probes_and_checkpoints(toy, tmp_path):
    result = train_app(AppTrainConfig(app="toy_test", out=str(tmp_path / "run")))
    steps = sorted({row["step"] for row in result.log if row["split"] == "eval"})
    assert steps == [0, 2, 4]
    assert set(result.final) == {"loss", "error"} and result.final["error"] >= 0
    train_losses = [row["value"] for row in result.log if row["statistic"] == "loss" and row["split"] == "train"]
    assert len(train_losses) == 4
    assert {row["probe"] for row in result.probe_rows} == {"sink", "entropy", "distance"}
    assert {row["variant"] for row in result.probe_rows} == {"deep"}
    assert result.attention_paths.keys() == {0, 1}
    app, loaded = load_app(result.checkpoint)
    assert loaded.config.data_args == {"seq_len": T, "seed": 0}  # the run's data can be rebuilt from the checkpoint
    batch = app.data(**loaded.config.data_args).batch(0, 2, split="eval")
    with torch.no_grad():
        assert torch.equal(loaded(batch["inputs"]), result.model.eval()(batch["inputs"]))
    assert (tmp_path / "run" / "train_log.csv").is_file()
    from attnlab.report.io import write_results

    paths = write_results(tmp_path / "run", result.results)
    saved = json.loads(paths["json"].read_text())
    assert saved["command"] == "app train" and saved["extras"]["app"]["variant"] == "deep"
    assert {row["variant"] for row in saved["rows"]} == {"deep"}
    assert saved["sections"]["distance"] == []  # its own figures would average the untrained steps in
    html = paths["html"].read_text()
    assert 'id="app-training"' in html and 'id="distance"' not in html and "BOS policy" not in html


def test_same_seed_same_run_and_compare_uses_the_same_data(toy):
    first = train_app(AppTrainConfig(app="toy_test", probes=()))
    second = train_app(AppTrainConfig(app="toy_test", probes=()))
    assert first.final == second.final
    compared = compare_variants(AppTrainConfig(app="toy_test", probes=("entropy",)))
    assert [row["variant"] for row in compared.table] == ["deep", "shallow"]
    assert compared.table[0]["loss"] == pytest.approx(first.final["loss"])  # same data, same seed, same run
    assert "entropy" in compared.table[0] and "sink_rate" not in compared.table[0]
    assert compared.results["config"]["variant"] is None  # a comparison ran every variant, not the first
    assert compared.results["config"]["variants"] == ["deep", "shallow"]
    assert first.config.variant == "deep" and first.results["config"]["variant"] == "deep"
    with pytest.raises(ConfigError, match="variants among deep, shallow"):
        compare_variants(AppTrainConfig(app="toy_test"), ("wide",))


def test_the_compare_table_summarises_the_apps_summary_sites(toy, monkeypatch):
    monkeypatch.setattr(toy, "summary_sites", lambda self: (1,))
    compared = compare_variants(AppTrainConfig(app="toy_test", probes=("entropy",)), ("deep",))
    rows = compared.runs["deep"].probe_rows
    site_1 = [r["value"] for r in rows if r["statistic"] == "entropy" and r["step"] == 4 and r["layer"] == 1]
    every = [r["value"] for r in rows if r["statistic"] == "entropy" and r["step"] == 4 and r["layer"] is not None]
    assert len(site_1) == 4 and len(every) == 8  # 4 heads per site
    assert compared.table[0]["entropy"] == pytest.approx(sum(site_1) / 4)
    assert compared.table[0]["entropy"] != pytest.approx(sum(every) / 8)
    assert compared.results["extras"]["compare"]["summary_sites"] == [1]


def test_compare_progress_counts_over_every_variant(toy):
    seen = []
    compare_variants(AppTrainConfig(app="toy_test", probes=()), progress=lambda done, total, _: seen.append((done, total)))
    assert {total for _, total in seen} == {8}  # 4 steps × 2 variants
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == 8  # never restarts at the second variant


# -- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_train_compare_and_bad_input(toy, tmp_path):
    from attnlab.cli.main import app

    runner = CliRunner()
    out = tmp_path / "cmp"
    done = runner.invoke(app, ["app", "compare", "toy_test", "--probe", "entropy", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "variant" in done.stdout and "shallow" in done.stdout
    assert (out / "report.html").is_file() and (out / "deep" / "checkpoint" / "model.safetensors").is_file()
    again = runner.invoke(app, ["app", "compare", "toy_test", "--out", str(out)])
    assert again.exit_code == 2 and "pass --force" in again.output
    bad = runner.invoke(app, ["app", "train", "toy_test", "--model-arg", "width=2", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no model argument width" in bad.output and "Traceback" not in bad.output
    one = runner.invoke(app, ["app", "train", "toy_test", "--variant", "shallow", "--steps", "2", "--probe", "none",
                              "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    assert json.loads((tmp_path / "one" / "results.json").read_text())["extras"]["app"]["variant"] == "shallow"
    listed = runner.invoke(app, ["ls", "apps"])
    assert listed.exit_code == 0 and "toy_test" in listed.stdout and "variants deep, shallow" in listed.stdout


# -- every built-in application: the generic checks, each app's own cases are in test_<app>.py ---------------------
SMALL = {  # each app's small generator arguments (shared ones set its model too): fast batches and models
    "hpnet": {"num_agents": 2, "num_forecasts": 4, "horizon": 3},
    "tscan": {"num_vars": 4, "num_times": 6, "num_relevant": 2, "window": 2},
    "oat": {"num_objects": 5, "grid": 3},
    "dare": {"num_items": 64, "num_categories": 8, "seq_len": 12, "num_candidates": 3},
    "hogformer": {"image_size": 16, "patch_size": 4},
}
BUILT_IN = [name for name in APPS.names() if name != "toy_test"]


def small(name, seed=0):
    """(app, data) of ``name`` at its SMALL sizes: hidden 16, 2 heads."""
    app_cls = APPS.get(name)
    model_args, data_args = app_cls.share_args({}, SMALL[name])
    app = app_cls(hidden_size=16, num_heads=2, **model_args)
    return app, app.data(seed=seed, **data_args)


def test_every_built_in_app_has_small_arguments_here():
    assert sorted(BUILT_IN) == sorted(SMALL)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_apps_batches_are_pure_in_seed_split_and_step(name):
    _, data = small(name, seed=1)
    first = data.batch(3, 4)
    assert all(torch.equal(first[key], data.batch(3, 4)[key]) for key in first)
    for other in (data.batch(4, 4), data.batch(3, 4, split="eval"), small(name, seed=2)[1].batch(3, 4)):
        assert any(not torch.equal(first[key], other[key]) for key in first)
    assert all(value.shape[0] == 4 and value.dtype in (torch.float32, torch.int64, torch.bool)
               for value in first.values())
    described = data.describe()
    assert described["name"] == name and described["seed"] == 1


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_apps_model_knobs_are_consistent(name):
    """Defaults within their model_hints bounds; shared arguments are knobs of both sides with equal defaults."""
    import inspect

    app_cls = APPS.get(name)
    assert app_cls.check_model_args({}) == app_cls.model_defaults
    assert set(app_cls.model_hints) <= set(app_cls.model_defaults)
    data_defaults = {key: p.default for key, p in inspect.signature(app_cls.data_class).parameters.items()}
    for key in app_cls.shared_args:
        assert app_cls.model_defaults[key] == data_defaults[key], key


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_app_trains_a_few_steps_and_reloads_from_its_checkpoint(name, tmp_path):
    result = train_app(AppTrainConfig(app=name, hidden_size=16, num_heads=2, steps=3, batch_size=4, eval_every=3,
                                      eval_batches=1, data_args=SMALL[name], probes=("entropy",),
                                      out=str(tmp_path / "run")))
    app_cls = APPS.get(name)
    assert {"loss", app_cls.headline} <= set(result.final)
    losses = [(row["step"], row["value"]) for row in result.log if row["split"] == "train"
              and row["statistic"] == "loss"]
    assert [step for step, _ in losses] == [1, 2, 3] and all(math.isfinite(value) for _, value in losses)
    assert {row["variant"] for row in result.probe_rows} == {next(iter(app_cls.variants))}
    assert result.attention_paths.keys() == set(range(result.model.config.num_hidden_layers))
    app, loaded = load_app(result.checkpoint)
    batch = app.data(**loaded.config.data_args).batch(0, 2, split="eval")
    with torch.no_grad():
        assert float(app.loss(loaded, batch)) == float(app.loss(result.model.eval(), batch))


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_session_sees_every_site_of_every_app(name):
    from attnlab import Session

    app, data = small(name)
    model = app.build_model(seed=0).eval()
    with torch.no_grad(), Session(model, probes=["entropy"]) as session:
        app.loss(model, data.batch(0, 2))
    rows = session.results()
    sites = set(range(model.config.num_hidden_layers))
    assert set(rows[rows.probe == "entropy"].layer.dropna().astype(int)) == sites
    assert set(session.attention_paths) == sites
