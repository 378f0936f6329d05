"""CARVE (METHODS #19): contrast maps over image tokens, the kept regions, pixel masking, re-query (tiny LLaVA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vlm_fixtures import IMAGE, IMAGE_TOKEN_ID, llava_batch, random_image, tiny_llava, tiny_llava_processor

from attnlab.analyses import ANALYSES
from attnlab.analyses.carve import (
    carve_maps, contrast, entropy, generic_batch, image_attention, keep_top, mask_images, mask_pixels,
)
from attnlab.capture.vlm_runner import VisionRunner
from attnlab.errors import ConfigError
from attnlab.protocols.carve import carve, mask_image
from attnlab.roles import ImageSpan

IDS = (IMAGE_TOKEN_ID,)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def processor():
    return tiny_llava_processor()


@pytest.fixture(scope="module")
def runner(llava, processor):
    return VisionRunner(llava, processor.tokenizer)


def test_contrast_is_the_ratio_and_lambda_damps_it():
    task = torch.tensor([[0.4, 0.1], [0.3, 0.2]], dtype=torch.float64)
    generic = torch.tensor([[0.5, 0.05], [0.3, 0.15]], dtype=torch.float64)
    torch.testing.assert_close(contrast(task, generic, 0.0), task / generic)
    assert keep_top(contrast(task, generic, 0.0), 0.25).nonzero().tolist() == [[0, 1]]  # 0.1 / 0.05 is the largest
    big = contrast(task, generic, 1e6)
    torch.testing.assert_close(big * 1e6, task, rtol=1e-5, atol=0)  # λ ≫ A_g: the map tends to the task map
    assert keep_top(big, 0.25).nonzero().tolist() == [[0, 0]]
    with pytest.raises(ConfigError, match="lam"):
        contrast(task, generic, -1.0)


def test_keep_top_counts_and_bounds():
    scores = torch.arange(16.0).view(4, 4)
    kept = keep_top(scores, 0.25)
    assert kept.sum() == 4 and kept[3].all()
    assert keep_top(scores, 0.01).sum() == 1 and keep_top(scores, 1.0).all()
    with pytest.raises(ConfigError, match="keep"):
        keep_top(scores, 0.0)


def test_masking_touches_only_pixels_outside_the_kept_tokens():
    pixels = torch.randn(3, 32, 32)
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[1, 2] = keep[3, 0] = True
    masked = mask_pixels(pixels, keep, fill=-7.0)
    inside = keep.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert torch.equal(masked[:, inside], pixels[:, inside])
    assert (masked[:, ~inside] == -7.0).all()
    image = random_image(1, 40, 24)
    out = np.array(mask_image(image, keep, fill=(1, 2, 3)))
    big = torch.nn.functional.interpolate(keep.float()[None, None], size=(24, 40), mode="nearest")[0, 0].bool().numpy()
    assert (out[big] == np.array(image)[big]).all() and (out[~big] == [1, 2, 3]).all()


def test_image_attention_is_renormalised_over_the_image_grid():
    probs = torch.rand(1, 2, 10, 10)
    queries = torch.zeros(1, 10, dtype=torch.bool)
    queries[0, 8:] = True
    span = ImageSpan(sequence=0, start=2, rows=2, cols=3)
    grid = image_attention(probs, queries, span)
    assert grid.shape == (2, 3)
    manual = probs[0][:, 8:, 2:8] / probs[0][:, 8:, 2:8].sum(-1, keepdim=True)
    torch.testing.assert_close(grid, manual.mean((0, 1)).double().view(2, 3))
    assert entropy(grid) <= np.log(6) + 1e-9
    with pytest.raises(ConfigError, match="no query token"):
        image_attention(probs, torch.zeros(1, 10, dtype=torch.bool), span)


def test_generic_batch_replaces_the_text_after_the_image(llava):
    batch = llava_batch(llava, [[1, 5, IMAGE, 6, 7, 8], [1, IMAGE, 9]], padding="left")
    generic, asked, plain = generic_batch(batch, IDS, [20, 21])
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(generic["input_ids"], generic["attention_mask"])]
    assert rows == [[1, 5] + [IMAGE_TOKEN_ID] * 16 + [20, 21], [1] + [IMAGE_TOKEN_ID] * 16 + [20, 21]]
    assert asked.sum(-1).tolist() == [3, 1] and asked[:, -1].all()  # no template: the question runs to the end
    assert generic["input_ids"][plain].view(2, 2).tolist() == [[20, 21]] * 2
    assert generic["pixel_values"] is batch["pixel_values"]
    with pytest.raises(ConfigError, match="sequence 0: no image"):
        generic_batch(llava_batch(llava, [[1, 5, 6]]), IDS, [20])


def test_generic_batch_keeps_markers_and_the_turn_end_and_pads_like_the_batch(llava):
    """Only the question span is replaced: closing markers (40) and the template suffix (41 = end, 42, 43) stay."""
    batch = llava_batch(llava, [[1, IMAGE, 40, 6, 7, 8, 41, 42, 43], [1, IMAGE, 40, 9, 41, 42, 43]], padding="right")
    generic, asked, plain = generic_batch(batch, IDS, [20, 21, 22], markers={40, 41}, ends={41})
    valid = generic["attention_mask"].bool()
    rows = [ids[mask].tolist() for ids, mask in zip(generic["input_ids"], valid)]
    image = [IMAGE_TOKEN_ID] * 16
    assert rows == [[1, *image, 40, 20, 21, 22, 41, 42, 43]] * 2
    assert not valid[:, -1].all() or valid.all()  # right padding kept (here both rows are equally long)
    assert batch["input_ids"][asked].tolist() == [6, 7, 8, 9]
    assert plain.nonzero()[:, 1].tolist() == [18, 19, 20] * 2
    with pytest.raises(ConfigError, match="sequence 1: no question"):
        generic_batch(llava_batch(llava, [[1, IMAGE, 40, 6, 41], [1, IMAGE, 40, 40]]), IDS, [20],
                      markers={40, 41}, ends={41})


@pytest.mark.parametrize("kind", ["qwen2_vl", "idefics3", "llava"])
def test_generic_prompt_is_the_templated_prompt_with_g_in_place_of_q(kind):
    """The generic batch equals the processor's own encoding of the generic instruction (closing marker, end of turn
    and assistant prompt kept), also with left padding, and the query rows are exactly the two instructions."""
    import attnlab.testing
    from attnlab.analyses.vlm_batches import prompt_markers

    if not hasattr(attnlab.testing, "tiny_vlm"):
        pytest.skip("attnlab.testing.tiny_vlm is not available")
    model, processor = attnlab.testing.tiny_vlm(kind)
    tokenizer, image = processor.tokenizer, random_image(3, 32, 32)

    def prompt(text):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)

    batch = dict(processor(images=[image, image], text=[prompt("what colour is it"), prompt("hi")],
                           return_tensors="pt", padding=True))
    wanted = dict(processor(images=[image], text=[prompt("Describe this image.")], return_tensors="pt"))
    ids = (model.config.image_token_id,)
    g = tokenizer("Describe this image.", add_special_tokens=False)["input_ids"]
    generic, asked, plain = generic_batch(batch, ids, g, **dict(zip(("markers", "ends"), prompt_markers(tokenizer))))
    expected = wanted["input_ids"][0].tolist()
    for b in range(2):
        assert generic["input_ids"][b][generic["attention_mask"][b].bool()].tolist() == expected
        assert generic["input_ids"][b][plain[b]].tolist() == g
    assert [tokenizer.decode(batch["input_ids"][b][asked[b]]) for b in range(2)] == ["what colour is it", "hi"]
    runner = VisionRunner(model, tokenizer)
    merge = int((runner.facts.vision or {}).get("merge") or 1)
    maps, _, _ = carve_maps(runner, batch, generic, ids=ids, queries=(asked, plain), layers=[1], lam=1e-3, keep=0.5,
                            merge=merge)
    assert len(maps) == 2 and all(m.task.sum() == pytest.approx(1.0) for m in maps)
    if kind != "qwen2_vl":  # the analysis masks pixel_values; Qwen2-VL's flattened patches are refused
        analysis = ANALYSES.get("carve")(generic="Describe this image.", layers=[1])
        analysis.prepare(runner.facts, runner)
        analysis.observe(runner, batch)
        assert {r["statistic"] for r in analysis.rows()} >= {"image_entropy", "requery_kl"}


def test_carve_maps_match_eager_attention_and_have_the_image_grid(llava, runner):
    batch = llava_batch(llava, [[1, 5, IMAGE, 6, 7], [1, IMAGE, 8, IMAGE, 9, 10]], padding="right")
    generic, asked, plain = generic_batch(batch, IDS, [20, 21, 22])
    maps, task_entropy, _ = carve_maps(runner, batch, generic, ids=IDS, queries=(asked, plain), layers=[1], lam=1e-3,
                                       keep=0.25)
    assert [(m.span.sequence, m.span.index, m.contrast.shape) for m in maps] == \
        [(0, 0, (4, 4)), (1, 0, (4, 4)), (1, 1, (4, 4))]
    assert task_entropy.shape == (2, 3)
    llava.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = llava(**batch, output_attentions=True).attentions[1]  # (B, H, L, L) of text layer 1
    finally:
        llava.set_attn_implementation("sdpa")
    # the second image of sequence 1: columns 18..33, queries = the text after it (columns 34, 35)
    rows = eager[1][:, 34:36, 18:34].double()
    expected = (rows / rows.sum(-1, keepdim=True)).mean((0, 1)).view(4, 4)
    torch.testing.assert_close(maps[2].task, expected, rtol=1e-4, atol=1e-6)
    for m in maps:
        assert m.task.sum() == pytest.approx(1.0) and m.generic.sum() == pytest.approx(1.0)
        torch.testing.assert_close(m.contrast, m.task / (m.generic + 1e-3))
        assert m.keep.sum() == 4 and (m.contrast[m.keep].min() >= m.contrast[~m.keep].max())


def test_carve_analysis_rows_extras_and_requery(llava, runner):
    analysis = ANALYSES.get("carve")(generic="describe this image", keep=0.5, max_maps=2)
    analysis.prepare(runner.facts, runner)
    assert analysis.chosen == [1] and analysis.generic_ids == runner.tokenizer("describe this image")["input_ids"]
    batch = llava_batch(llava, [[1, 5, IMAGE, 6, 7], [1, IMAGE, 8, 9]])
    analysis.observe(runner, batch)
    rows = {(r["statistic"], r["layer"]): r["value"] for r in analysis.rows()}
    assert set(rows) == {("image_entropy", 0), ("image_entropy", 1), ("generic_image_entropy", 0),
                         ("generic_image_entropy", 1), ("requery_kl", None), ("answer_changed", None)}
    assert 0 < rows[("image_entropy", 1)] <= np.log(16) + 1e-9 and rows[("requery_kl", None)] > 0
    extras = analysis.extras()
    assert len(extras["maps"]) == 2 and np.array(extras["maps"][0]["grid"]).shape == (4, 4)
    assert len(extras["maps"][0]["markers"]) == 8 and extras["maps"][1]["sequence"] == 1
    with pytest.raises(ConfigError, match="pixel_values"):
        analysis.observe(runner, {k: v for k, v in batch.items() if k != "pixel_values"})


def test_carve_end_to_end_from_an_image_and_a_question(llava, processor):
    image = random_image(5, 32, 32)
    result = carve(llava, image, "what colour is the shape", processor=processor, generic="describe this image",
                   keep=0.25, fill=(0, 0, 0), max_new_tokens=3)
    assert result.map.contrast.shape == (4, 4) and result.map.keep.sum() == 4
    inside = result.map.keep.repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()
    masked, original = np.array(result.masked_image), np.array(image)
    assert (masked[inside] == original[inside]).all() and (masked[~inside] == 0).all()
    assert isinstance(result.answer, str) and isinstance(result.original_answer, str)
    assert set(result.to_json()) >= {"contrast", "kept", "answer", "original_answer"}
    with pytest.raises(ConfigError, match="processor"):
        carve(llava, image, "what")


def test_mask_images_skips_idefics_padding_images():
    pixels = torch.randn(2, 3, 3, 8, 8)
    pixels[1, 2] = 0  # row 1 holds two images; the third entry is padding
    keeps = [torch.tensor([[True, False], [False, False]])] * 5
    out = mask_images(pixels, keeps, fill=5.0)
    assert (out[1, 2] == 0).all() and torch.equal(out[0, 0, :, :4, :4], pixels[0, 0, :, :4, :4])
    assert (out[0, 0, :, 4:, :] == 5.0).all()
    with pytest.raises(ConfigError, match="4 image runs"):
        mask_images(pixels, keeps[:4])


@pytest.mark.parametrize("kind", ["qwen2_vl", "idefics3"])
def test_other_families_get_maps_on_their_own_grids(kind, tmp_path):
    import attnlab.testing

    if not hasattr(attnlab.testing, "tiny_vlm"):  # the loading helper's tiny families (issue 16)
        pytest.skip("attnlab.testing.tiny_vlm is not available")
    model, processor = attnlab.testing.tiny_vlm(kind)
    result = carve(model, random_image(4, 48, 40), "what colour is the shape", processor=processor, max_new_tokens=0)
    rows, cols = result.map.contrast.shape
    assert result.map.task.sum() == pytest.approx(1.0) and rows * cols >= 4 and result.answer == ""


@pytest.mark.parametrize("name", ["vhd", "carve"])
def test_states_split_over_processes_merge_like_one_run(llava, runner, name):
    """Exported, encoded, decoded and merged states (a run over shards) give the rows and extras of one pass."""
    from attnlab.distributed import decode_state, encode_state
    from attnlab.shards import bundle_of, load_bundle, merge_bundles

    batches = [llava_batch(llava, [[1, 5, IMAGE, 6, 7]], seed=s) for s in range(3)]
    whole, first, second, fresh = (ANALYSES.get(name)() for _ in range(4))
    for obj in (whole, first, second, fresh):
        obj.prepare(runner.facts, runner)
    assert whole.shardable
    for i, batch in enumerate(batches):
        whole.observe(runner, batch)
        (first if i < 2 else second).observe(runner, batch)
    parts = [decode_state(encode_state(*bundle_of([obj], {}))) for obj in (first, second)]
    load_bundle([fresh], merge_bundles([fresh], *parts))
    rows = {(r["statistic"], r["layer"], r["head"]): r["value"] for r in whole.rows()}
    assert {(r["statistic"], r["layer"], r["head"]): r["value"] for r in fresh.rows()} == pytest.approx(rows)
    key = "maps" if name == "carve" else "tokens"
    assert len(fresh.extras()[key]) == len(whole.extras()[key])


def test_a_word_outside_a_small_vocabulary_stays_in_the_question():
    """The lab VLM's word-level tokenizer maps unknown words to <unk>, which must not end the question (the generic
    instruction "Describe this image." is all <unk> there)."""
    from attnlab.analyses.vlm_batches import prompt_markers, question_columns
    from attnlab.lab.vlm.model import build_tokenizer

    tokenizer = build_tokenizer()
    markers, ends = prompt_markers(tokenizer)
    assert tokenizer.unk_token_id not in ends
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    words = tokenizer("is there a purple circle ?", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id in words  # "purple" is not a word of the lab's vocabulary
    ids = torch.tensor([tokenizer.bos_token_id] + [image_id] * 4 + words)
    start, end = question_columns(ids, ids == image_id, markers, ends)
    assert ids[start:end].tolist() == words
