"""VHD (head-output divergence with vs without the image) and VHR's selection on a tiny random LLaVA (METHODS #7)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama
from vlm_fixtures import IMAGE, IMAGE_TOKEN_ID, image_tokens, llava_batch, tiny_llava

from attnlab import Session
from attnlab.analyses import ANALYSES
from attnlab.analyses.vhd import (
    counterfactual_batch, measured_tokens, select_vhr, t_vhd, top_fraction, vhd_of_batch,
)
from attnlab.capture.vlm_runner import VisionRunner
from attnlab.edits import parse_edit_list, parse_edit_spec
from attnlab.edits.vhr import VHR, format_pairs, parse_pairs
from attnlab.errors import ConfigError

IDS = (IMAGE_TOKEN_ID,)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def runner(llava):
    return VisionRunner(llava)


def head_outputs(model, batch):
    """Oracle: a plain forward (no attnlab) with pre-hooks on each text block's o_proj → per layer (B, L, H, Dv)."""
    captured, handles = {}, []
    for index, block in enumerate(model.model.language_model.layers):
        def hook(module, args, index=index):
            B, L, width = args[0].shape
            captured[index] = args[0].detach().view(B, L, 4, width // 4).double()
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logits = model(**batch).logits
    finally:
        for handle in handles:
            handle.remove()
    return [captured[i] for i in sorted(captured)], logits


def test_drop_removes_the_image_tokens_and_maps_every_text_column(llava):
    batch = llava_batch(llava, [[1, 5, IMAGE, 6, 7], [1, IMAGE, 8, IMAGE, 9]], padding="left")
    dropped, column = counterfactual_batch(batch, IDS, "drop")
    assert "pixel_values" not in dropped
    assert dropped["input_ids"].tolist() == [[1, 5, 6, 7], [3, 1, 8, 9]]  # left padding kept (pad id 3)
    assert dropped["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    text = valid & (ids != IMAGE_TOKEN_ID)
    rows, cols = text.nonzero().unbind(1)
    assert torch.equal(dropped["input_ids"][rows, column[rows, cols]], ids[rows, cols])
    assert (column[~text] == -1).all()


@pytest.mark.parametrize("kind", ["noise", "blank"])
def test_noise_and_blank_change_only_the_pixels(llava, kind):
    batch = llava_batch(llava, [[1, 5, IMAGE, 6]])
    other, column = counterfactual_batch(batch, IDS, kind, seed=3)
    assert torch.equal(other["input_ids"], batch["input_ids"]) and torch.equal(column[0], torch.arange(19))
    assert other["pixel_values"].shape == batch["pixel_values"].shape
    assert (other["pixel_values"] == 1e-4).all() if kind == "blank" else other["pixel_values"].std() > 0.5
    with pytest.raises(ConfigError, match="no pixel_values"):
        counterfactual_batch({"input_ids": batch["input_ids"]}, IDS, kind)


def test_measured_tokens(llava):
    batch = llava_batch(llava, [[1, 5, IMAGE, 6, 7], [1, IMAGE, 8]], padding="right")
    L = batch["input_ids"].shape[1]
    assert measured_tokens(batch, IDS, "last").nonzero().tolist() == [[0, 19], [1, 17]]
    assert measured_tokens(batch, IDS, "after_image").nonzero().tolist() == [[0, 18], [0, 19], [1, 17]]
    answer = torch.zeros(2, L, dtype=torch.bool)
    answer[0, 19] = answer[1, 5] = True  # column 5 of row 1 is an image token: never measured
    assert measured_tokens({**batch, "answer_mask": answer}, IDS, "answer").nonzero().tolist() == [[0, 19]]
    with pytest.raises(ConfigError, match="answer_mask"):
        measured_tokens(batch, IDS, "answer")


def test_vhd_equals_a_plain_second_forward_without_the_image(llava, runner):
    batch = llava_batch(llava, [[1, 5, IMAGE, 6, 7, 8], [1, 9, IMAGE, 10, 11, 12]])
    distance, norm, where = vhd_of_batch(runner, batch, ids=IDS, counterfactual="drop", at="after_image")
    with_image, _ = head_outputs(llava, batch)
    without, _ = head_outputs(llava, {"input_ids": torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])})
    P = image_tokens(llava)
    expected = torch.stack([(w[:, P + 2:] - wo[:, 2:]).norm(dim=-1) for w, wo in zip(with_image, without)], 2)
    assert where.tolist() == [[b, c] for b in range(2) for c in range(P + 2, P + 5)]
    torch.testing.assert_close(distance, expected.flatten(0, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm, torch.stack([w[:, P + 2:].norm(dim=-1) for w in with_image], 2).flatten(0, 1),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(t_vhd(distance), distance.flatten(1).mean(-1))
    assert (distance[:, 0] > 0).all()  # every head of the first layer already reads the image


def test_blank_counterfactual_of_a_blank_image_is_zero(llava, runner):
    batch = llava_batch(llava, [[1, 5, IMAGE, 6]], pixel_values=torch.full((1, 3, 32, 32), 1e-4))
    distance, _, _ = vhd_of_batch(runner, batch, ids=IDS, counterfactual="blank", at="last")
    assert (distance == 0).all()


def test_vhd_analysis_rows_extras_and_merge(llava, runner):
    batches = [llava_batch(llava, [[1, 5, IMAGE, 6, 7]], seed=s) for s in range(2)]
    whole = ANALYSES.get("vhd")(counterfactual="noise", at="after_image", max_tokens=3)
    first, second = (ANALYSES.get("vhd")(counterfactual="noise", at="after_image", max_tokens=3) for _ in range(2))
    for obj in (whole, first, second):
        obj.prepare(runner.facts, runner)
    for batch in batches:
        whole.observe(runner, batch)
    first.observe(runner, batches[0])
    second.observe(runner, batches[1])
    first.merge(second)
    rows = {(r["statistic"], r["layer"], r["head"]): r["value"] for r in whole.rows()}
    assert len(rows) == 2 * 2 * 4 and all(v > 0 for v in rows.values())
    merged = {(r["statistic"], r["layer"], r["head"]): r["value"] for r in first.rows()}
    assert merged == pytest.approx(rows)
    extras = whole.extras()
    assert extras["counterfactual"] == "noise" and len(extras["tokens"]) == 3 and len(extras["top_heads"]) == 8
    scores = [t["t_vhd"] for t in extras["tokens"]]
    assert scores == sorted(scores) and [t["t_vhd"] for t in first.extras()["tokens"]] == scores


def test_text_only_models_are_refused():
    from attnlab.capture.runner import ModelRunner

    runner = ModelRunner(tiny_llama())
    with pytest.raises(ConfigError, match="vision-language"):
        ANALYSES.get("vhd")().prepare(runner.facts, runner)


# VHR -------------------------------------------------------------------------------------------------------------
def test_vhr_specs_round_trip_and_bad_pairs_are_one_line_errors():
    edit = parse_edit_spec("vhr:alpha=2,pairs=1.3+0.1+0.2")
    assert edit.chosen == {0: (1, 2), 1: (3,)} and edit.layers == (0, 1)
    assert edit.spec() == "vhr:alpha=2.0,pairs=0.1+0.2+1.3"
    assert parse_edit_spec(edit.spec()).chosen == edit.chosen
    assert [e.name for e in parse_edit_list("vhr:pairs=0.1+1.2+head_scale:scale=0,heads=1")] == ["vhr", "head_scale"]
    assert parse_pairs(format_pairs({2: [3, 1]})) == {2: (1, 3)}
    assert parse_edit_spec("vhr:alpha=1").is_identity() and VHR.from_selection({}).is_identity()
    for bad in ("1", "a.b", "0.1,2", "0..1", "-1.2"):
        with pytest.raises(ConfigError, match="vhr") as error:
            VHR(pairs=bad)
        assert "\n" not in str(error.value)


def _session_logits(model, batch, edits):
    with torch.no_grad(), Session(model, edits=edits):
        return model(**batch).logits


def test_fraction_zero_and_alpha_one_leave_logits_bit_identical(llava, runner):
    batch = llava_batch(llava, [[1, 5, IMAGE, 6, 7], [1, IMAGE, 8]])
    llava.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = llava(**batch).logits
    none = select_vhr(runner, [batch], fraction=0.0)
    assert none.chosen == {} and none.is_identity()
    assert torch.equal(_session_logits(llava, batch, [none]), plain)
    ones = select_vhr(runner, [batch], fraction=0.5, alpha=1.0)
    assert sum(map(len, ones.chosen.values())) == 4 and ones.is_identity()
    assert torch.equal(_session_logits(llava, batch, [ones]), plain)


def test_vhr_scales_only_the_selected_heads(llava):
    batch = llava_batch(llava, [[1, 5, IMAGE, 6, 7]])
    edit = VHR.from_selection({0: [1], 1: [0, 3]}, alpha=2.0)
    captured, handles = {}, []
    for index, block in enumerate(llava.model.language_model.layers):
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(
            lambda module, args, index=index: captured.__setitem__(index, args[0].detach().view(1, -1, 4, 8))))
    try:
        _session_logits(llava, batch, [VHR.from_selection({0: [1]}, alpha=1.0)])
        base = dict(captured)
        _session_logits(llava, batch, [edit])
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(captured[0][:, :, 1], 2 * base[0][:, :, 1], rtol=0, atol=0)
    assert torch.equal(captured[0][:, :, [0, 2, 3]], base[0][:, :, [0, 2, 3]])
    assert not torch.equal(captured[1][:, :, 1], base[1][:, :, 1])  # layer 1 reads layer 0's reinforced output


def test_select_vhr_goes_layer_by_layer_with_earlier_layers_reinforced(llava, runner):
    batch = llava_batch(llava, [[1, 5, IMAGE, 6, 7], [1, IMAGE, 8, 9]])
    edit = select_vhr(runner, [batch], fraction=0.5, alpha=3.0, counterfactual="drop", at="after_image")
    assert set(edit.chosen) == {0, 1} and all(len(h) == 2 for h in edit.chosen.values())
    distance, _, _ = vhd_of_batch(runner, batch, ids=IDS, counterfactual="drop", at="after_image")
    first = distance[:, 0].mean(0)
    torch.testing.assert_close(edit.scores[0], first)
    assert list(edit.chosen[0]) == top_fraction(first, 0.5)
    reinforced, _, _ = vhd_of_batch(runner, batch, ids=IDS, counterfactual="drop", at="after_image",
                                    edits=[VHR.from_selection({0: edit.chosen[0]}, alpha=3.0)])
    torch.testing.assert_close(edit.scores[1], reinforced[:, 1].mean(0))
    assert not torch.allclose(edit.scores[1], distance[:, 1].mean(0))
    with pytest.raises(ConfigError, match="fraction"):
        select_vhr(runner, [batch], fraction=1.5)


def test_a_runner_that_drops_the_pixels_is_refused(llava):
    class TextOnlyRunner(VisionRunner):  # gives the model only input_ids and attention_mask
        def forward(self, batch, **options):
            return super().forward({key: batch[key] for key in ("input_ids", "attention_mask")}, **options)

    plain = TextOnlyRunner(llava)
    batch = llava_batch(llava, [[1, 5, IMAGE, 6]])
    analysis = ANALYSES.get("vhd")()
    analysis.prepare(plain.facts, plain)
    with pytest.raises(ConfigError, match="does not pass pixel_values"):
        analysis.observe(plain, batch)
    with pytest.raises(ConfigError, match="does not pass pixel_values"):
        select_vhr(plain, [batch])


@pytest.mark.parametrize("kind", ["qwen2_vl", "idefics3"])
def test_other_families_measure_and_select(kind):
    import attnlab.testing

    if not hasattr(attnlab.testing, "tiny_vlm"):  # the loading helper's tiny families (issue 16)
        pytest.skip("attnlab.testing.tiny_vlm is not available")
    from vlm_fixtures import random_image

    from attnlab.capture.vlm_inputs import ImageTextItem, build_batch

    model, processor = attnlab.testing.tiny_vlm(kind)
    runner = VisionRunner(model, processor.tokenizer)
    image = random_image(2)
    path = f"/tmp/attnlab_vhd_{kind}.png"
    image.save(path)
    batch, _ = build_batch(processor, [ImageTextItem(path, "what colour is the shape")],
                           image_token_ids=runner.facts.image_token_ids)
    for counterfactual in ("drop", "noise", "blank"):
        distance, _, _ = vhd_of_batch(runner, batch, ids=runner.facts.image_token_ids, counterfactual=counterfactual,
                                      at="after_image")
        assert distance.shape[1:] == (2, 4) and (distance > 0).any()
    assert sum(map(len, select_vhr(runner, [batch], fraction=0.5).chosen.values())) == 4


def test_t_vhd_of_each_generated_token(llava):
    from attnlab.protocols.vhr import generation_t_vhd

    batch = llava_batch(llava, [[1, 5, IMAGE, 6, 7], [1, IMAGE, 8]], padding="left")
    per_sequence = generation_t_vhd(llava, batch, max_new_tokens=3)
    assert [len(row) for row in per_sequence] == [3, 3]
    llava.set_attn_implementation("sdpa")
    with torch.no_grad():
        generated = llava.generate(**batch, max_new_tokens=3, do_sample=False)[:, batch["input_ids"].shape[1]:]
    assert [[token for token, _ in row] for row in per_sequence] == [[str(int(t)) for t in g] for g in generated]
    # step 0 is the prompt's last token: the same as at="last" on the prompt alone
    distance, _, _ = vhd_of_batch(VisionRunner(llava), batch, ids=IDS, counterfactual="drop", at="last")
    assert [row[0][1] for row in per_sequence] == pytest.approx(t_vhd(distance).tolist())
    with pytest.raises(ConfigError, match="left-padded"):
        generation_t_vhd(llava, llava_batch(llava, [[1, 5, IMAGE, 6, 7], [1, IMAGE, 8]], padding="right"))


def test_vhr_restricted_to_text_queries_leaves_image_rows(llava):
    batch = llava_batch(llava, [[1, 5, IMAGE, 6, 7]])
    captured = {}
    o_proj = llava.model.language_model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(
        lambda module, args: captured.__setitem__("x", args[0].detach().view(1, -1, 4, 8)))
    try:
        # the base reinforces head 2 only: the same (eager) path as the edited run, head 1 untouched
        _session_logits(llava, batch, ["vhr:alpha=2,pairs=0.2,queries=text"])
        base = captured["x"]
        _session_logits(llava, batch, ["vhr:alpha=2,pairs=0.1+0.2,queries=text"])
        edited = captured["x"]
    finally:
        handle.remove()
    image = batch["input_ids"][0] == IMAGE_TOKEN_ID
    assert torch.equal(edited[0, image], base[0, image])
    torch.testing.assert_close(edited[0, ~image, 1], 2 * base[0, ~image, 1], rtol=1e-6, atol=1e-6)
    assert parse_edit_spec("vhr:alpha=2,pairs=0.1,queries=text").spec() == "vhr:alpha=2.0,pairs=0.1,queries=text"
