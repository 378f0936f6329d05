"""Token roles and the session on a vision-language model (tiny random LLaVA built from configs)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from vlm_fixtures import Recorder

from attnlab import Session
from attnlab.edits import parse_edit_spec
from attnlab.errors import ConfigError, ShapeError
from attnlab.functional.sink_dims import rms_normalised, sink_dimensions, sink_tokens
from attnlab.roles import GENERATED, IMAGE, PAD, SYSTEM, TEXT, ImageSpan, TokenRoles, given_roles, role_codes

IMAGE_ID = 99


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                         vision_feature_select_strategy="default", vision_feature_layer=-1, image_seq_length=16)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def batch_two_images():
    """Row 0: text, image, text, image, text. Row 1: left padding, text, image, text, image."""
    row0 = [1, 5] + [IMAGE_ID] * 16 + [7] + [IMAGE_ID] * 16 + [8, 9]
    row1 = [0, 0, 6] + [IMAGE_ID] * 16 + [7] + [IMAGE_ID] * 16 + [9]
    ids = torch.tensor([row0, row1])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    torch.manual_seed(1)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(4, 3, 32, 32)}


# roles ------------------------------------------------------------------------------------------------------
def test_roles_from_ids_runs_grids_and_padding():
    batch = batch_two_images()
    roles = TokenRoles.from_input_ids(batch["input_ids"], batch["attention_mask"].bool(), [IMAGE_ID])
    assert roles.images == (ImageSpan(0, 2, 4, 4, 1, 0), ImageSpan(0, 19, 4, 4, 1, 1),
                            ImageSpan(1, 3, 4, 4, 1, 0), ImageSpan(1, 20, 4, 4, 1, 1))
    assert roles.codes[1, :2].tolist() == [PAD, PAD] and roles.codes[1, 2] == TEXT
    assert int(roles.mask("image").sum()) == 64
    frame, row, col = roles.images[1].grid_of(torch.tensor([19, 24, 34]))
    assert frame.tolist() == [0, 0, 0] and row.tolist() == [0, 1, 3] and col.tolist() == [0, 1, 3]
    with pytest.raises(ShapeError):
        roles.images[1].grid_of(torch.tensor([18]))


def test_span_index_numbers_each_image_column_and_is_cached():
    batch = batch_two_images()
    roles = TokenRoles.from_input_ids(batch["input_ids"], batch["attention_mask"].bool(), [IMAGE_ID])
    expected = torch.full((2, 37), -1)
    expected[0, 2:18], expected[0, 19:35], expected[1, 3:19], expected[1, 20:36] = 0, 1, 2, 3  # written out by hand
    assert torch.equal(roles.span_index(), expected) and roles.span_index() is roles.span_index()
    assert torch.equal(TokenRoles(roles.codes).span_index(), torch.full((2, 37), -1))  # no image


def test_roles_with_grids_and_errors():
    ids = torch.tensor([[1] + [IMAGE_ID] * 6 + [2]])
    valid = torch.ones_like(ids, dtype=torch.bool)
    roles = TokenRoles.from_input_ids(ids, valid, [IMAGE_ID], grids=torch.tensor([[1, 4, 6]]), merge=2)
    assert roles.images == (ImageSpan(0, 1, 2, 3, 1, 0),)
    strip = TokenRoles.from_input_ids(ids, valid, [IMAGE_ID])  # 6 tokens, no grid given: layout unknown
    assert strip.images == (ImageSpan(0, 1, 1, 6, 1, 0, grid_known=False),)
    with pytest.raises(ConfigError, match="grid"):
        TokenRoles.from_input_ids(ids, valid, [IMAGE_ID], grids=torch.tensor([[1, 4, 4]]), merge=2)
    with pytest.raises(ConfigError, match="more images"):
        two = torch.tensor([[1] + [IMAGE_ID] * 6 + [2] + [IMAGE_ID] * 6])
        TokenRoles.from_input_ids(two, torch.ones_like(two, dtype=torch.bool), [IMAGE_ID],
                                  grids=torch.tensor([[1, 4, 6]]), merge=2)
    # multi-axis RoPE positions (t, h, w) give the grid when the processor's grids are not passed (generate)
    axes = torch.zeros(3, 1, 8, dtype=torch.long)
    axes[1, 0, 1:7] = torch.tensor([0, 0, 0, 1, 1, 1])
    axes[2, 0, 1:7] = torch.tensor([0, 1, 2, 0, 1, 2])
    assert TokenRoles.from_input_ids(ids, valid, [IMAGE_ID], position_ids=axes).images == (ImageSpan(0, 1, 2, 3),)
    # adjacent images split by the model's tokens per image; images and videos take their own grids
    adjacent = torch.tensor([[1] + [IMAGE_ID] * 8 + [2]])
    split = TokenRoles.from_input_ids(adjacent, torch.ones_like(adjacent, dtype=torch.bool), [IMAGE_ID],
                                      tokens_per_image=4)
    assert split.images == (ImageSpan(0, 1, 2, 2, 1, 0), ImageSpan(0, 5, 2, 2, 1, 1))
    mixed = torch.tensor([[1] + [IMAGE_ID] * 2 + [2] + [98] * 4])
    both = TokenRoles.from_input_ids(mixed, torch.ones_like(mixed, dtype=torch.bool), [IMAGE_ID, 98],
                                     grids={IMAGE_ID: torch.tensor([[1, 2, 4]]), 98: torch.tensor([[2, 2, 4]])},
                                     merge=2)
    assert both.images == (ImageSpan(0, 1, 1, 2, 1, 0), ImageSpan(0, 4, 1, 2, 2, 1))
    system = torch.zeros_like(valid)
    system[0, 0] = True
    assert TokenRoles.from_input_ids(ids, valid, [IMAGE_ID], grids=torch.tensor([[1, 2, 3]]),
                                     system=system).codes[0, 0] == SYSTEM
    assert role_codes("image+text") == (IMAGE, TEXT)
    with pytest.raises(ConfigError, match="roles must be among"):
        role_codes("pixels")


# the session on a VLM ------------------------------------------------------------------------------------------
def test_session_roles_padding_two_images_and_vision_tower_untouched():
    model, batch = tiny_llava(), batch_two_images()
    with torch.no_grad():
        reference = model(**batch).logits
    recorder = Recorder()
    with Session(model, probes=[recorder, "entropy", "sink"]) as session, torch.no_grad():
        logits = model(**batch).logits
        assert model.config.vision_config._attn_implementation != "attnlab"
    assert session.facts.modality == "vision-language" and session.facts.image_token_ids == (IMAGE_ID,)
    assert sorted(session.calls_per_layer) == [0, 1]  # only the language model's two layers, not the vision tower
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    call = recorder.calls[0]
    assert call.query_roles.shape == (2, batch["input_ids"].shape[1])
    assert torch.equal(call.query_roles == PAD, ~batch["attention_mask"].bool())
    assert [span.start for span in call.images] == [2, 19, 3, 20]
    assert model.config.text_config._attn_implementation == "sdpa"  # restored


def test_decoding_steps_get_generated_roles():
    model = tiny_llava()
    batch = batch_two_images()
    recorder = Recorder()
    with Session(model, probes=[recorder]), torch.no_grad():
        model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    call = recorder.calls[1]
    assert call.q_len == 1 and call.key_roles.shape[1] == batch["input_ids"].shape[1] + 2
    assert call.query_roles[:, -1].tolist() == [GENERATED, GENERATED]
    assert int((call.key_roles == IMAGE).sum()) == 64


def test_given_roles_override_and_shape_error():
    model, batch = tiny_llava(), batch_two_images()
    roles = TokenRoles.from_input_ids(batch["input_ids"], batch["attention_mask"].bool(), [IMAGE_ID])
    codes = roles.codes.clone()
    codes[0, :2] = SYSTEM
    recorder = Recorder()
    with Session(model, probes=[recorder]), torch.no_grad(), given_roles(TokenRoles(codes, roles.images)):
        model(**batch)
    assert recorder.calls[0].query_roles[0, :2].tolist() == [SYSTEM, SYSTEM]
    with pytest.raises(ConfigError, match="given_roles"):
        with Session(model, probes=[Recorder()]), torch.no_grad(), given_roles(TokenRoles(codes[:, 1:])):
            model(**batch)


# edits by role -------------------------------------------------------------------------------------------------
def _probs(model, batch, edits):
    from attnlab.capture.patterns import PatternProbe

    recorder = PatternProbe(layers=[0], heads=[0, 1, 2, 3])
    with Session(model, probes=[recorder], edits=edits) as session, torch.no_grad():
        model(**batch)
    return session.patterns()[0].probs[:, 0]  # layer 0: (B, H, L, L)


def _layer0_qkv(model, batch):
    """Layer 0's query/key/value states (B, H, L, D) and logit scale, recorded from the model's own attention."""
    record = {}
    attention = model.model.language_model.layers[0].self_attn
    original = attention.forward

    def forward(*args, **kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        shape = (*hidden.shape[:-1], -1, attention.head_dim)
        query = attention.q_proj(hidden).view(shape).transpose(1, 2)
        key = attention.k_proj(hidden).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        record["query"], record["key"] = query, key
        return original(*args, **kwargs)

    attention.forward = forward
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        attention.forward = original
    groups = attention.num_key_value_groups
    return record["query"], record["key"].repeat_interleave(groups, dim=1), attention.scaling


def test_role_selected_edit_matches_a_reference_with_padding_and_two_images():
    """temperature τ on text-query × image-key logits only, against softmax of logits edited by hand."""
    model, batch = tiny_llava(), batch_two_images()
    edited = _probs(model, batch, ["temperature:tau=0.3,queries=text,keys=image"])
    query, key, scale = _layer0_qkv(model, batch)
    roles = TokenRoles.from_input_ids(batch["input_ids"], batch["attention_mask"].bool(), [IMAGE_ID])
    valid = batch["attention_mask"].bool()
    logits = (query.double() @ key.double().transpose(-1, -2)) * scale  # (B, H, L, L)
    chosen = roles.mask("text")[:, None, :, None] & roles.mask("image")[:, None, None, :]
    logits = torch.where(chosen, logits / 0.3, logits)
    L = logits.shape[-1]
    keep = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    expected = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    real_rows = valid[:, None, :, None].expand_as(expected)
    torch.testing.assert_close(edited.double()[real_rows], expected[real_rows], rtol=1e-4, atol=1e-5)
    plain = _probs(model, batch, [])
    torch.testing.assert_close(edited[:, :, roles.mask("image")[0]][0], plain[:, :, roles.mask("image")[0]][0])
    assert (edited - plain).abs().max() > 1e-3
    assert torch.equal(_probs(model, batch, ["temperature:tau=1,queries=text,keys=image"]), plain)


def test_role_selection_refused_where_it_has_no_meaning():
    with pytest.raises(ConfigError, match="keys= selects keys"):
        parse_edit_spec("head_scale:scale=2,keys=image")
    with pytest.raises(ConfigError, match="keys= selects keys"):
        parse_edit_spec("redistribution:fraction=0.5,keys=image")
    with pytest.raises(ConfigError, match="no parameter queries"):
        parse_edit_spec("concentric_positions:queries=text")
    with pytest.raises(ConfigError, match="must be one of"):
        parse_edit_spec("head_scale:scale=2,queries=pixels")
    assert parse_edit_spec("head_scale:scale=2,queries=text+generated").spec() == \
        "head_scale:scale=2.0,queries=text+generated"


def test_output_edit_by_query_role_acts_from_the_image_on():
    model, batch = tiny_llava(), batch_two_images()
    recorder_plain, recorder_edit = Recorder(), Recorder()
    with Session(model, probes=[recorder_plain]), torch.no_grad():
        plain = model(**batch).logits
    with Session(model, probes=[recorder_edit], edits=["head_scale:scale=0,queries=image"]), torch.no_grad():
        edited = model(**batch).logits
    roles = TokenRoles.from_input_ids(batch["input_ids"], batch["attention_mask"].bool(), [IMAGE_ID])
    first_image = roles.images[0]
    # rows before the first image are upstream of every image token: unchanged up to the kernel (eager vs SDPA)
    torch.testing.assert_close(edited[0, : first_image.start], plain[0, : first_image.start], rtol=0, atol=1e-6)
    assert (edited[0, first_image.start:] - plain[0, first_image.start:]).abs().max() > 1e-4


# hidden states for edits ---------------------------------------------------------------------------------------
def test_hidden_states_reach_edits_that_need_them():
    from attnlab.edits.base import Edit

    seen = {}

    class NeedsHidden(Edit):
        name = "needs_hidden"
        stage = "output"
        needs_hidden_states = True
        identity = None

        def output_mod(self, output, call):
            seen[call.layer_idx] = call.hidden_states
            return output

    model, batch = tiny_llava(), batch_two_images()
    with torch.no_grad():
        expected = model(**batch, output_hidden_states=True).hidden_states  # [embeddings, layer 0 out, …]
    with Session(model, edits=[NeedsHidden()]), torch.no_grad():
        model(**batch)
    for layer in (0, 1):  # each layer's input: the embeddings, then layer 0's output
        torch.testing.assert_close(seen[layer], expected[layer], rtol=1e-5, atol=1e-5)


def test_cached_continuation_reads_new_images_and_role_edits_refuse_unknown_roles():
    model = tiny_llava()
    first = {"input_ids": torch.tensor([[1, 5] + [IMAGE_ID] * 16 + [7]]), "attention_mask": torch.ones(1, 19,
                                                                                                      dtype=torch.long)}
    torch.manual_seed(2)
    first["pixel_values"] = torch.randn(1, 3, 32, 32)
    chunk = torch.tensor([[8] + [IMAGE_ID] * 16 + [9, 10]])
    recorder = Recorder()
    with Session(model, probes=[recorder]), torch.no_grad():
        out = model(**first, use_cache=True)
        model(input_ids=chunk, attention_mask=torch.ones(1, 38, dtype=torch.long), pixel_values=first["pixel_values"],
              past_key_values=out.past_key_values, use_cache=True)
    call = recorder.calls[0]
    assert call.query_roles[0].tolist() == [TEXT] + [IMAGE] * 16 + [TEXT, TEXT]
    assert [(span.start, span.index) for span in call.images] == [(2, 0), (20, 1)]
    recorder = Recorder()  # a decoding step without a mask (generate drops an all-ones one) continues the roles
    with Session(model, probes=[recorder]), torch.no_grad():
        out = model(input_ids=first["input_ids"], pixel_values=first["pixel_values"], use_cache=True)
        model(input_ids=torch.tensor([[3]]), past_key_values=out.past_key_values, use_cache=True)
    assert recorder.calls[0].key_roles[0].tolist() == [TEXT, TEXT] + [IMAGE] * 16 + [TEXT, GENERATED]
    with pytest.raises(ConfigError, match="roles of this forward are unknown"):  # embeddings only: no ids to read
        with Session(model, edits=["temperature:tau=0.5,keys=image"]), torch.no_grad():
            model(inputs_embeds=model.get_input_embeddings()(first["input_ids"]))


def test_role_edit_that_selects_nothing_never_fires_on_a_text_model():
    from transformers import LlamaForCausalLM

    from attnlab.errors import EditNotFiredError

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).eval()
    with pytest.raises(EditNotFiredError, match="roles occur"):
        with Session(model, edits=["head_scale:scale=0,queries=image"]), torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))


# sink dimensions (VAR's detector) ------------------------------------------------------------------------------
def test_sink_dimensions_find_massive_activations():
    torch.manual_seed(0)
    hidden = torch.randn(2, 10, 1024, dtype=torch.float64)  # φ ≤ sqrt(D): τ = 20 needs D > 400
    hidden[0, 3, 7] = 500.0
    hidden[1, 5, 40] = -400.0
    dims = sink_dimensions(hidden, top=2)
    assert sorted(dims.tolist()) == [7, 40]
    flags = sink_tokens(hidden, dims, tau=20.0)
    assert flags.nonzero().tolist() == [[0, 3], [1, 5]]
    x = hidden[0, 3]
    torch.testing.assert_close(rms_normalised(x), x / torch.sqrt(x.pow(2).mean() + 1e-6))
    with pytest.raises(ShapeError):
        sink_dimensions(hidden, top=0)
