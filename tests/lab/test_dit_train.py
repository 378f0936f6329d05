"""The DiT lab's models, training, sampler, folder format and CLI on tiny settings: finite losses, bit-identical
predictions after a save/load round trip, sampler shapes and timesteps, classifier-free guidance, one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnlab.errors import ConfigError
from attnlab.lab.dit import evaluate
from attnlab.lab.dit.model import DitSpec
from attnlab.lab.dit.pipeline import LabPipeline, is_lab_dit_dir, load_pipeline, save_pipeline, to_uint8
from attnlab.lab.dit.train import DitTrainConfig, draw_batch, train_dit

TINY = {"layers": 1, "heads": 2, "head_dim": 8, "text_dim": 8, "max_words": 8}


@pytest.fixture(scope="module", params=["image", "video"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dit") / request.param
    record = train_dit(DitTrainConfig(kind=request.param, steps=3, batch_size=4, warmup_steps=1, spec=TINY,
                                      out=str(out)))
    return out, record


def test_three_steps_train_with_finite_losses_and_write_the_folder(trained: tuple[Path, dict]) -> None:
    out, record = trained
    losses = record["train"]["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) and 0 < x < 10 for x in losses)
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["steps"] == 3 and saved["config"]["spec"]["heads"] == 2
    assert saved["train"]["seconds"] > 0 and "losses" not in saved["train"]
    log = (out / "train_log.csv").read_text().splitlines()
    assert log[0] == "step,statistic,value" and len(log) == 1 + 3 * 3
    assert is_lab_dit_dir(out) and is_lab_dit_dir(out / "checkpoint") and not is_lab_dit_dir(out / "missing")
    lab = json.loads((out / "checkpoint" / "lab_dit.json").read_text())
    assert lab["kind"] == record["config"]["kind"] and lab["train"]["steps"] == 3
    assert (out / "checkpoint" / "transformer" / "config.json").is_file()


def test_save_load_round_trip_gives_bit_identical_predictions(trained: tuple[Path, dict], tmp_path: Path) -> None:
    out, record = trained
    original = record["pipeline"].eval()
    loaded = load_pipeline(out)
    assert type(loaded.transformer) is type(original.transformer) and loaded.spec == original.spec
    frames = 3 if loaded.kind == "video" else None
    x = loaded.noise(2, seed=5, frames=frames)
    hidden, keep = loaded.encode(["a red circle", "the blue square"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, 0.4, hidden, keep),
                                   original.velocity(x, 0.4, *original.encode(["a red circle", "the blue square"])),
                                   rtol=0, atol=0)
    again = load_pipeline(save_pipeline(loaded, tmp_path / "copy"))
    assert torch.equal(again.sample(["a red circle"], steps=2, frames=frames),
                       loaded.sample(["a red circle"], steps=2, frames=frames))


def test_sampler_shapes_range_and_decreasing_float_timesteps(trained: tuple[Path, dict]) -> None:
    pipe = load_pipeline(trained[0])
    seen: list[tuple[float, int]] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs["timestep"]
        assert timestep.dtype == torch.float32 and timestep.shape == (kwargs["hidden_states"].shape[0],)
        seen.append((float(timestep[0]), kwargs["hidden_states"].shape[0]))

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        images = pipe.sample(["a red circle", "a blue square and a green triangle"], steps=4, guidance=2.0, seed=1,
                             frames=6 if pipe.kind == "video" else None)
    finally:
        handle.remove()
    expected = (2, 3, 32, 32) if pipe.kind == "image" else (2, 3, 6, 32, 32)
    assert images.shape == expected and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert [t for t, _ in seen] == [1000, 1000, 750, 750, 500, 500, 250, 250]  # caption, then empty caption
    assert to_uint8(images).shape == (expected[0], *expected[2:], 3)


def test_guidance_one_is_the_conditional_path_and_cfg_mixes_two_forwards(trained: tuple[Path, dict]) -> None:
    pipe = load_pipeline(trained[0])
    frames = 2 if pipe.kind == "video" else None
    captions = ["a yellow triangle", "the green circle"]

    def conditional(x: torch.Tensor, t: float, cond) -> torch.Tensor:
        return pipe.velocity(x, t, cond.hidden, cond.keep)

    plain = pipe.sample(captions, steps=3, guidance=1.0, seed=2, frames=frames)
    assert torch.equal(plain, pipe.sample(captions, steps=3, seed=2, frames=frames, predict=conditional))
    guided = pipe.sample(captions, steps=1, guidance=4.0, seed=2, frames=frames)
    x = pipe.noise(2, seed=2, frames=frames)
    with torch.no_grad():
        v_c = pipe.velocity(x, 1.0, *pipe.encode(captions))
        v_u = pipe.velocity(x, 1.0, *pipe.encode(["", ""]))
    expected = ((x - (v_u + 4.0 * (v_c - v_u))).clamp(-1, 1) + 1) / 2  # one Euler step from t = 1 to 0
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(guided, pipe.sample(captions, steps=1, guidance=1.0, seed=2, frames=frames))


def test_bad_sampler_and_training_inputs_are_one_line_config_errors(trained: tuple[Path, dict],
                                                                    tmp_path: Path) -> None:
    pipe = load_pipeline(trained[0])
    frames = None if pipe.kind == "image" else 4
    bad_calls = [dict(captions=["a pink circle"]), dict(captions=["a red circle"], steps=0),
                 dict(captions=["a red circle"], guidance=0.0)]
    bad_calls.append(dict(captions=["a red circle"], frames=4) if pipe.kind == "image"
                     else dict(captions=["a red circle"], frames=17))
    for kwargs in bad_calls:
        kwargs.setdefault("frames", frames)
        with pytest.raises(ConfigError) as error:
            pipe.sample(**kwargs)
        assert "\n" not in str(error.value)
    for bad in (dict(kind="audio"), dict(spec={"depth": 2}), dict(spec={"patch_size": 5}), dict(steps=2,
                warmup_steps=3), dict(spec={"kind": "video"}), dict(caption_dropout=1.5)):
        with pytest.raises(ConfigError):
            DitTrainConfig(**bad)
    with pytest.raises(ConfigError):
        DitSpec(kind="video", head_dim=9)
    (tmp_path / "x").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        train_dit(DitTrainConfig(steps=1, warmup_steps=0, spec=TINY, out=str(tmp_path)))
    with pytest.raises(ConfigError, match="not a DiT lab folder"):
        load_pipeline(tmp_path)


def test_batches_depend_on_seed_and_step_and_drop_captions() -> None:
    config = DitTrainConfig(batch_size=32, caption_dropout=0.5, spec=TINY)
    (a, ca), (b, cb) = draw_batch(config, 3), draw_batch(config, 3)
    assert torch.equal(a, b) and ca == cb and a.shape == (32, 3, 32, 32)
    assert float(a.min()) >= -1 and float(a.max()) <= 1
    assert not torch.equal(draw_batch(config, 4)[0], a)
    assert 0 < sum(c == () for c in ca) < 32
    video, captions = draw_batch(DitTrainConfig(kind="video", batch_size=2, spec={**TINY, "frames": 3}), 0)
    assert video.shape == (2, 3, 3, 32, 32)


def test_lab_pipeline_build_is_seeded() -> None:
    a, b = LabPipeline.build(DitSpec(**TINY), seed=1), LabPipeline.build(DitSpec(**TINY), seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.transformer.parameters(), b.transformer.parameters()))
    assert torch.equal(a.text.token.weight, b.text.token.weight)


@pytest.fixture()
def quick_classifier(monkeypatch: pytest.MonkeyPatch) -> None:
    real = evaluate.train_classifier
    monkeypatch.setattr(evaluate, "train_classifier", lambda seed=0: real(seed, steps=5, batch_size=8))


def test_evaluate_pipeline_reports_flat_floats(trained: tuple[Path, dict], quick_classifier: None) -> None:
    pipe = load_pipeline(trained[0])
    report = evaluate.evaluate_pipeline(pipe, samples=2, steps=2)
    assert report["kind"] == pipe.kind and report["samples"] == 2
    names = (["colour_accuracy", "two_object_accuracy", "colour_fidelity"] if pipe.kind == "image"
             else ["frame_accuracy_f4", "frame_accuracy_beyond_f8", "track_rmse_f8", "direction_accuracy_f4"])
    for name in names:
        assert isinstance(report[name], float) and isinstance(report[f"real_{name}"], float)
    if pipe.kind == "image":
        assert report["real_colour_fidelity"] == 1 and report["real_colour_error"] == 0
    else:
        assert report["real_direction_accuracy_f8"] == 1 and report["real_track_rmse_f8"] < 0.5


def test_cli_train_sample_eval(tmp_path: Path, quick_classifier: None) -> None:
    from attnlab.cli.dit_cmd import dit_app

    runner = CliRunner()
    spec = [arg for key, value in TINY.items() for arg in ("--spec", f"{key}={value}")]
    for video in ([], ["--video"]):
        out = tmp_path / f"run{len(video)}"
        result = runner.invoke(dit_app, ["train", "--out", str(out), "--steps", "2", "--batch-size", "2",
                                         "--warmup-steps", "0", *video, *spec])
        assert result.exit_code == 0, result.output
        assert (out / "checkpoint" / "lab_dit.json").is_file() and (out / "results.json").is_file()
        samples = tmp_path / f"samples{len(video)}"
        result = runner.invoke(dit_app, ["sample", str(out), "--caption", "a red circle", "--caption", "",
                                         "--steps", "2", "--out", str(samples), *(["--frames", "3"] if video else [])])
        assert result.exit_code == 0, result.output
        from PIL import Image

        with Image.open(samples / "sample_00.png") as png:
            assert png.size == ((3 * 32 if video else 32), 32)
        assert json.loads((samples / "samples.json").read_text())["captions"] == ["a red circle", ""]
        report = tmp_path / f"eval{len(video)}.json"
        result = runner.invoke(dit_app, ["eval", str(out), "--samples", "2", "--steps", "2", "--out", str(report)])
        assert result.exit_code == 0, result.output
        assert json.loads(report.read_text())["kind"] == ("video" if video else "image")
    not_empty = runner.invoke(dit_app, ["train", "--out", str(tmp_path / "run0"), "--steps", "1",
                                        "--warmup-steps", "0"])
    assert not_empty.exit_code == 2 and "not empty" in not_empty.output
    bad = runner.invoke(dit_app, ["sample", str(tmp_path / "run0"), "--caption", "a pink circle"])
    assert bad.exit_code == 2 and "unknown caption word 'pink'" in bad.output
    assert runner.invoke(dit_app, ["sample", str(tmp_path / "run0"), "--caption", "a red circle",
                                   "--frames", "4"]).exit_code == 2
    assert runner.invoke(dit_app, ["eval", str(tmp_path / "missing")]).exit_code == 2
    assert runner.invoke(dit_app, ["train", "--out", str(tmp_path / "b"), "--spec", "layers=x"]).exit_code == 2


def test_diffusion_session_counts_the_samplers_steps_and_leaves_it_unchanged(trained: tuple[Path, dict]) -> None:
    from attnlab.diffusion import DiffusionSession

    pipe = load_pipeline(trained[0])
    frames = 2 if pipe.kind == "video" else None
    plain = pipe.sample(["a red circle"], steps=3, guidance=2.0, seed=4, frames=frames)
    with DiffusionSession(pipe.transformer, probes=["entropy"]) as session:
        observed = pipe.sample(["a red circle"], steps=3, guidance=2.0, seed=4, frames=frames)
    torch.testing.assert_close(observed, plain, rtol=1e-5, atol=1e-5)
    results = session.results()
    assert sorted(set(results["denoising_step"])) == [0, 1, 2]
    assert set(session.layer_table()["kind"]) == {"self", "cross"}
