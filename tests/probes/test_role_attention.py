"""role_attention: attention mass by (query role, key role) per layer × head, and per image token, against plain
loops over the probabilities; under padding, two images in one sequence, GQA, merges and a real tiny LLaVA."""

from __future__ import annotations

import re

import pytest
import torch
from vlm_fixtures import merged_rows

from attnlab.columns import SCHEMA_VERSION
from attnlab.probes import PROBES
from attnlab.report.render import render_html
from attnlab.report.sections import section_specs
from attnlab.roles import ROLES
from tests.probes.vlm_helpers import (
    batch_roles, blocks, facts_for, make_call, random_probs, tiny_llava, vlm_batch,
)

LAYERS, HEADS, KV = 2, 4, 2


def _oracle(probs_by_layer, roles, valid, overlay_rows=(1,), sequences=10**9):
    """mass[l, h, r, s] and per-image received attention, by loops over (b, h, i, j)."""
    R = len(ROLES)
    codes = roles.codes.long()
    mass = torch.zeros(LAYERS, HEADS, R, R, dtype=torch.float64)
    count = torch.zeros(LAYERS, HEADS, R, dtype=torch.float64)
    received = {(span.sequence, span.index): torch.zeros(span.length, dtype=torch.float64) for span in roles.images
                if span.sequence < sequences}
    rows = dict.fromkeys(received, 0.0)
    B, L = valid.shape
    for layer, probs in enumerate(probs_by_layer):
        p = probs.double()
        for b in range(B):
            for h in range(HEADS):
                for i in range(L):
                    if not valid[b, i]:
                        continue
                    r = int(codes[b, i])
                    count[layer, h, r] += 1
                    for j in range(L):
                        mass[layer, h, r, int(codes[b, j])] += p[b, h, i, j]
                    if r in overlay_rows:
                        for span in roles.spans(b):
                            if (b, span.index) in received:
                                received[(b, span.index)] += p[b, h, i, span.start:span.end]
                                rows[(b, span.index)] += 1
    return mass / count[..., None], count, {key: received[key] / rows[key] for key in received}


def _feed(probe, roles, valid, probs_by_layer, block_size=7, offset=0):
    for layer, probs in enumerate(probs_by_layer):
        call = make_call(layer, roles, valid, HEADS, KV, offset=offset)
        probe.begin_call(call)
        _, keep = random_probs(valid, HEADS, 0)
        for block in blocks(probs, keep, block_size):
            probe.update(call, block)
        probe.end_call(call)


def _setup(seed=0):
    batch = vlm_batch(seed)
    roles = batch_roles(batch)
    valid = batch["attention_mask"].bool()
    probs = [random_probs(valid, HEADS, seed + 10 * layer)[0] for layer in range(LAYERS)]
    return roles, valid, probs


def _probe(**kwargs):
    probe = PROBES.get("role_attention")(**kwargs)
    probe.bind(facts_for(LAYERS, HEADS, KV))
    return probe


@pytest.mark.parametrize("block_size", [pytest.param(7, id="blocks-7"), pytest.param(64, id="one-block")])
def test_matches_a_plain_loop_under_padding_and_two_images(block_size):
    roles, valid, probs = _setup()
    assert [(s.sequence, s.index, s.rows, s.cols) for s in roles.images] == [(0, 0, 4, 4), (0, 1, 4, 4), (1, 0, 4, 4)]
    probe = _probe()
    _feed(probe, roles, valid, probs, block_size)
    mass, count, received = _oracle(probs, roles, valid)
    seen = count > 0
    torch.testing.assert_close(probe.mass()[seen], mass[seen])
    assert torch.equal(probe.query_count, count)
    torch.testing.assert_close(probe.mass()[seen].sum(-1), torch.ones_like(mass[seen].sum(-1)))  # per query
    grids = {(g["sequence"], g["image_index"]): g for g in probe.image_grids()}
    assert set(grids) == set(received)
    for key, expected in received.items():
        got = torch.tensor(grids[key]["grid"], dtype=torch.float64).flatten()
        torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-5)
        assert grids[key]["markers"][0] == [int(expected.argmax()) // 4, int(expected.argmax()) % 4]


def test_rows_long_format_and_named_role_pairs():
    roles, valid, probs = _setup()
    probe = _probe()
    _feed(probe, roles, valid, probs)
    rows = probe.rows()
    assert {r["statistic"] for r in rows} == {f"{q}_to_{k}" for q in ("text", "image") for k in ("text", "image")}
    assert all(set(r) == {"probe", "statistic", "layer", "head", "position", "value"} for r in rows)
    text_to_image = [r for r in rows if r["statistic"] == "text_to_image"]
    assert len(text_to_image) == LAYERS * HEADS and all(0 < r["value"] < 1 for r in text_to_image)


def test_overlay_queries_and_overlay_limit():
    roles, valid, probs = _setup()
    probe = _probe(queries="text+image", overlays=1)
    _feed(probe, roles, valid, probs)
    _, _, received = _oracle(probs, roles, valid, overlay_rows=(1, 2), sequences=1)
    grids = probe.image_grids()
    assert [(g["sequence"], g["image_index"]) for g in grids] == [(0, 0), (0, 1)]
    for g in grids:
        got = torch.tensor(g["grid"], dtype=torch.float64).flatten()
        torch.testing.assert_close(got, received[(g["sequence"], g["image_index"])], atol=1e-7, rtol=1e-5)


def test_split_batches_merge_and_export_round_trip():
    """Sequence 0 and sequence 1 fed as separate batches (offsets 0 and 1), merged, equal the whole batch."""
    roles, valid, probs = _setup()
    whole = _probe()
    _feed(whole, roles, valid, probs)
    merged_probe = merged_rows(_probe, _feed, roles, valid, probs)
    torch.testing.assert_close(merged_probe.mass_sum, whole.mass_sum, rtol=1e-6, atol=1e-6)  # float32 sum order
    merged, expected = merged_probe.image_grids(), whole.image_grids()
    assert [(g["sequence"], g["image_index"], g["markers"]) for g in merged] == \
        [(g["sequence"], g["image_index"], g["markers"]) for g in expected]
    for got, want in zip(merged, expected):
        torch.testing.assert_close(torch.tensor(got["grid"]), torch.tensor(want["grid"]), rtol=1e-5, atol=1e-7)


def test_text_only_model_is_all_text():
    from tests.tiny_models import tiny_llama
    from attnlab.capture.session import Session

    model = tiny_llama(layers=2, num_heads=4, num_kv_heads=2)
    probe = PROBES.get("role_attention")()
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with Session(model, probes=[probe]), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    rows = probe.rows()
    assert {r["statistic"] for r in rows} == {"text_to_text"}
    assert all(r["value"] == pytest.approx(1.0 if r["statistic"] == "text_to_text" else 0.0) for r in rows)
    assert probe.image_grids() == []


def test_tiny_llava_in_a_session_matches_eager_attentions():
    """The Session derives roles from the image token id; the probe's numbers equal loops over the attentions
    transformers' eager path returns (left padding, two images in one sequence, GQA)."""
    from attnlab.capture.session import Session

    model = tiny_llava(layers=LAYERS, heads=HEADS, kv_heads=KV)
    batch = vlm_batch(3)
    roles, valid = batch_roles(batch), batch["attention_mask"].bool()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    probs = [a * valid[:, None, :, None] for a in attentions]  # transformers leaves padded query rows uniform
    mass, count, received = _oracle(probs, roles, valid)
    probe = PROBES.get("role_attention")()
    with Session(model, probes=[probe]), torch.no_grad():
        model(**batch)
    seen = count > 0
    torch.testing.assert_close(probe.mass()[seen], mass[seen], atol=1e-5, rtol=1e-4)
    grids = {(g["sequence"], g["image_index"]): g for g in probe.image_grids()}
    for key, expected in received.items():
        torch.testing.assert_close(torch.tensor(grids[key]["grid"], dtype=torch.float64).flatten(), expected,
                                   atol=1e-5, rtol=1e-4)


def test_report_draws_the_role_section_and_the_overlay(tmp_path):
    from PIL import Image

    roles, valid, probs = _setup()
    probe = _probe()
    _feed(probe, roles, valid, probs)
    Image.new("RGB", (40, 40), (90, 90, 200)).save(tmp_path / "a.png")
    inputs = [{"sequence": 0, "prompt": "p", "answer": None,
               "images": [{"path": str(tmp_path / "a.png"), "sha256": "", "width": 40, "height": 40}] * 2}]
    results = {"schema_version": SCHEMA_VERSION, "command": "probe",
               "model": {"name": "tiny", "num_layers": LAYERS, "num_heads": HEADS}, "rows": probe.rows(),
               "extras": {probe.name: probe.extras()}, "sections": section_specs([probe]), "inputs": inputs}
    html = render_html(results)
    section = re.search(r'<section id="role-attention">(.*?)</section>', html, re.S).group(1)
    assert section.count("<img") == 3  # heatmap, layer curve, overlay
    assert "attention to image tokens" in section or "to image tokens" in section
    assert "image not found" not in section
    table = re.search(r"Attention share by role.*?</table>", section, re.S).group(0)
    present = {row["statistic"].replace("_to_", " → ") for row in probe.rows()}
    assert "image → text" in present and "image → text" in table  # every pair present is a column ...
    assert "generated → image" not in present and "generated → image" not in table  # ... and only those


def test_generation_adds_generated_rows_and_keeps_grids_to_the_prompt():
    from attnlab.capture.session import Session

    model = tiny_llava(layers=LAYERS, heads=HEADS, kv_heads=KV)
    batch = vlm_batch(4)
    probe = PROBES.get("role_attention")()
    with Session(model, probes=[probe]), torch.no_grad():
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    rows = probe.rows()
    generated = [r for r in rows if r["statistic"] == "generated_to_image"]
    assert len(generated) == LAYERS * HEADS and all(0 < r["value"] < 1 for r in generated)
    shares = {}
    for r in rows:
        if r["statistic"].startswith("generated_to_"):
            shares[(r["layer"], r["head"])] = shares.get((r["layer"], r["head"]), 0.0) + r["value"]
    assert all(total == pytest.approx(1.0, abs=1e-5) for total in shares.values())
    assert [(g["sequence"], g["image_index"]) for g in probe.image_grids()] == [(0, 0), (0, 1), (1, 0)]


def _tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    vocab = 120
    text = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV,
                intermediate_size=64, vocab_size=vocab, max_position_embeddings=512,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, bos_token_id=1, eos_token_id=2)
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1, video_token_id=vocab - 2,
                           vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4, vocab_size=vocab,
                           bos_token_id=1, eos_token_id=2)
    return Qwen2VLForConditionalGeneration(config).eval(), vocab - 1


def test_qwen2_vl_grids_are_not_square():
    """Qwen2-VL: grids from image_grid_thw (merge 2) give 2 × 3 and 1 × 2 token grids; the numbers match loops over
    the eager attentions (left padding)."""
    from attnlab.capture.session import Session
    from attnlab.roles import TokenRoles

    model, image_id = _tiny_qwen2_vl()
    grid = torch.tensor([[1, 4, 6], [1, 2, 4]])
    ids = torch.randint(1, image_id - 4, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[0, 2:8] = image_id
    ids[1, 5:7] = image_id
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "image_grid_thw": grid,
             "pixel_values": torch.randn(32, 24, generator=torch.Generator().manual_seed(1)),
             "mm_token_type_ids": (ids == image_id).long()}
    roles = TokenRoles.from_input_ids(ids, mask.bool(), [image_id], grids=grid, merge=2)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    mass, count, received = _oracle([a * mask.bool()[:, None, :, None] for a in attentions], roles, mask.bool())
    probe = PROBES.get("role_attention")()
    with Session(model, probes=[probe]), torch.no_grad():
        model(**batch)
    seen = count > 0
    torch.testing.assert_close(probe.mass()[seen], mass[seen], atol=1e-5, rtol=1e-4)
    grids = probe.image_grids()
    assert [(g["rows"], g["cols"]) for g in grids] == [(2, 3), (1, 2)]
    for g in grids:
        expected = received[(g["sequence"], g["image_index"])]
        torch.testing.assert_close(torch.tensor(g["grid"], dtype=torch.float64).flatten(), expected, atol=1e-5,
                                   rtol=1e-4)


def test_a_near_uniform_grid_gets_no_markers():
    """Circling the "most attended" tokens of a map flat to within 1 % would suggest a contrast that is not there."""
    probe = _probe()
    flat = torch.tensor([1.0, 1.001, 1.002, 0.999], dtype=torch.float64)
    peaked = torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    probe.grids = {(0, 0): (flat, 1, 2, 2, 1), (0, 1): (peaked, 1, 2, 2, 1)}
    grids = {g["image_index"]: g for g in probe.image_grids()}
    assert grids[0]["markers"] == [] and "near-uniform" in grids[0]["title"]
    assert grids[1]["markers"][0] == [0, 1] and "near-uniform" not in grids[1]["title"]
