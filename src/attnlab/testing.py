"""Test helpers shared by attnlab's tests and by users testing their own probes/kernels.

One tolerance table (STYLE.md rule 33) and the golden/ref/fast comparison of FlexAttention's tests:
``err(fast, golden) <= fudge * err(ref, golden) + atol``.
"""

from __future__ import annotations

import torch
from torch import Tensor

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-7, "atol": 1e-7, "fudge": 1.0},
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-5, "fudge": 10.0},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5, "fudge": 1.1},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5, "fudge": 1.1},
}

# Logits of a model under the attnlab backend vs attn_implementation="sdpa" (fp32), tiny random models.
MODEL_LOGITS_ATOL = 1e-5
# The same on the bundled SmolLM2 (HF's own eager path differs from sdpa by ~7.6e-5 there).
REAL_MODEL_LOGITS_ATOL = 1e-4


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None) -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``dtype`` (default: actual's dtype)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=tol["rtol"], atol=tol["atol"])


def assert_matches_reference(fast: Tensor, ref: Tensor, golden: Tensor, dtype: torch.dtype | None = None) -> None:
    """Fail if the fast path is further from the float64 golden than ``fudge`` × the same-dtype reference is."""
    tol = TOLERANCES[dtype or fast.dtype]
    golden = golden.double()
    fast_err = (fast.double() - golden).abs().max().item()
    ref_err = (ref.double() - golden).abs().max().item()
    bound = tol["fudge"] * ref_err + tol["atol"]
    if not fast_err <= bound:
        raise AssertionError(f"fast path error {fast_err:.3e} exceeds {tol['fudge']} x reference error "
                             f"{ref_err:.3e} + atol {tol['atol']:.1e}")


def feed_probs(probes, probs: Tensor, keep: Tensor | None = None, *, value: Tensor | None = None,
               causal: bool = True, query_valid: Tensor | None = None, input_ids: Tensor | None = None,
               layer_idx: int = 0, num_layers: int = 1, num_kv_heads: int | None = None, bind: bool = True) -> None:
    """Feed constructed attention to probes, as one attention call of one layer (for known-answer tests).

    Args:
        probes: Probe instances.
        probs: (B, H, L, L) attention probabilities (rows of masked-out queries may be all 0).
        keep: bool (B|1, H|1, L, L) visibility mask; default: causal if ``causal`` else all visible.
        value: (B, Hkv, L, Dv) value states; default ones with Hkv = H.
        query_valid: (B, L) bool, real tokens; default all True.
        input_ids: (B, L) token ids, for token-level tables.
    """
    from attnlab.functional.attention import BlockView, causal_keep
    from attnlab.facts import ModelFacts
    from attnlab.probes.base import AttentionCall, SequenceInfo

    B, H, Lq, Lk = probs.shape
    if keep is None and causal:
        keep = causal_keep(Lq, Lk)[None, None]
    valid = torch.ones(B, Lk, dtype=torch.bool) if query_valid is None else query_valid
    value = torch.ones(B, num_kv_heads or H, Lk, 4) if value is None else value
    sequence = SequenceInfo.from_mask(valid, input_ids, 0)
    call = AttentionCall(layer_idx=layer_idx, num_heads=H, num_kv_heads=value.shape[1], q_len=Lq, kv_len=Lk,
                         causal=causal, scale=1.0, value=value, query_valid=valid[:, Lk - Lq:], key_valid=valid,
                         query_positions=sequence.positions[:, Lk - Lq:], key_positions=sequence.positions,
                         sequence=sequence)
    logits = torch.log(probs).clamp_min(torch.finfo(probs.dtype).min)  # the kernel's finite masked logits
    block = BlockView(probs=probs, logits=logits, keep=keep, q_index=torch.arange(Lq))
    for probe in probes:
        if bind:
            probe.bind(ModelFacts(num_layers=num_layers, num_heads=H, num_kv_heads=value.shape[1],
                                  head_dim=value.shape[-1], hidden_size=H * value.shape[-1]))
        probe.begin_call(call)
        probe.update(call, block)
        probe.end_call(call)


# ---------------------------------------------------------------------------------------------------------------
# Tiny random vision-language models (issue 16): configs + an offline processor, so tests and users can try VLM
# code paths without the hub. The text side reads the bundled SmolLM2 tokenizer (attnlab.capture.loading.
# load_tokenizer("smollm2-135m"), fetched once like the bundled model) with each family's image tokens added.

VLM_KINDS = ("llava", "qwen2_vl", "idefics3")
TINY_VLM_IMAGE = 32  # pixels: the side every tiny processor resizes an image to (Idefics3: its longest edge)
# A processor chat template that takes list contents ({"type": "image"} / {"type": "text"}) as hub VLMs do.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ image_placeholder }}\n{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_PLACEHOLDER = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "idefics3": "<image>"}


def _tiny_vlm_tokenizer(kind: str):
    """The bundled SmolLM2 tokenizer with ``kind``'s image tokens added as special tokens (left padding)."""
    from attnlab.capture.loading import load_tokenizer

    tokenizer, _ = load_tokenizer("smollm2-135m")
    extra = {"llava": ["<image>"], "qwen2_vl": ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                                                "<|video_pad|>"],
             "idefics3": ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
             + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]}[kind]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.padding_side = "left"
    return tokenizer


def _text_config(tokenizer) -> dict:
    """A 2-layer Llama-style text decoder (4 heads, 2 kv heads, head_dim 8) over ``tokenizer``'s ids."""
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 512,
            "tie_word_embeddings": True, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def tiny_vlm(kind: str = "llava", seed: int = 0):
    """A tiny random vision-language model and its offline processor: ``(model, processor)``.

    ``kind``:

    - ``"llava"``: LlavaForConditionalGeneration, CLIP vision tower (image 32 px, patch 8, 2 layers) + Llama text
      (2 layers, 4 heads, 2 kv heads); ``vision_feature_select_strategy="default"`` (CLIP's CLS dropped), so
      one image is (32/8)² = 16 ``<image>`` tokens, a 4 × 4 grid.
    - ``"qwen2_vl"``: Qwen2VLForConditionalGeneration (mrope text, vision patch 4, merge 2); a 32 × 32 image is
      ``image_grid_thw`` (1, 8, 8), i.e. 16 ``<|image_pad|>`` tokens in a 4 × 4 grid.
    - ``"idefics3"``: Idefics3ForConditionalGeneration (SigLIP-style vision 32 px, patch 8, pixel shuffle 2) +
      Llama text; one image (no splitting) is 4 ``<image>`` tokens, a 2 × 2 grid, between
      ``<fake_token_around_image><global-img>`` and ``<fake_token_around_image>``.

    The processor is the family's transformers processor around the bundled SmolLM2 tokenizer (image tokens
    added) and the family's PIL image processor (no torchvision needed), with a chat template that accepts image
    parts. Weights are random (seeded); the model is in eval mode, float32, ``attn_implementation="sdpa"``.

    The text models have 2 layers, so the default layers of ``var`` (2 … L-2) and ``dual_stream`` (from layer 2
    on) are empty there and a session raises EditNotFiredError; pass ``layers=`` (e.g. ``var:layers=1``).

    Raises:
        ValueError: unknown ``kind`` (one of :data:`VLM_KINDS`).
        AssetError: the bundled tokenizer cannot be fetched (first use, offline).
    """
    if kind not in VLM_KINDS:
        raise ValueError(f"kind must be one of {', '.join(VLM_KINDS)}, got {kind!r}")
    tokenizer = _tiny_vlm_tokenizer(kind)
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    template = _TINY_CHAT_TEMPLATE.replace("{{ image_placeholder }}", _PLACEHOLDER[kind])
    size = TINY_VLM_IMAGE
    if kind == "llava":
        from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                                  LlavaForConditionalGeneration, LlavaProcessor)

        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=size, patch_size=8, projection_dim=16)
        config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text_config(tokenizer)),
                             image_token_id=ids("<image>"), vision_feature_select_strategy="default",
                             vision_feature_layer=-1, projector_hidden_act="gelu", image_seq_length=16)
        model = LlavaForConditionalGeneration(config)
        images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=template)
    elif kind == "qwen2_vl":
        from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil,
                                  Qwen2VLProcessor)

        text = {**_text_config(tokenizer), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                           "mrope_section": [1, 1, 2]}}
        vision = {"depth": 2, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "patch_size": 4,
                  "spatial_merge_size": 2, "temporal_patch_size": 2}
        config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                               video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                               vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
        model = Qwen2VLForConditionalGeneration(config)
        pixels = size * size
        images = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                          min_pixels=pixels, max_pixels=pixels)
        from attnlab.capture.vlm_loading import image_only_processor

        # without a video processor: transformers builds those only with torchvision
        processor = image_only_processor(Qwen2VLProcessor)(image_processor=images, tokenizer=tokenizer,
                                                           chat_template=template)
    else:
        from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                                  Idefics3Processor, Idefics3VisionConfig, LlamaConfig)

        vision = Idefics3VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=size, patch_size=8)
        config = Idefics3Config(vision_config=vision, text_config=LlamaConfig(**_text_config(tokenizer)),
                                image_token_id=ids("<image>"), scale_factor=2, tie_word_embeddings=True)
        model = Idefics3ForConditionalGeneration(config)
        images = Idefics3ImageProcessorPil(size={"longest_edge": size}, max_image_size={"longest_edge": size},
                                           do_image_splitting=False)
        processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                      chat_template=template)
    return model.eval(), processor


def save_tiny_vlm(folder, kind: str = "llava", seed: int = 0):
    """Save :func:`tiny_vlm` (safetensors weights, config, processor and tokenizer) in ``folder`` and return it,
    so ``attnlab.load_model(folder)`` loads it offline like a hub VLM folder."""
    from attnlab.capture.loading import no_hf_progress_bars

    model, processor = tiny_vlm(kind, seed)
    with no_hf_progress_bars():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


DIFFUSERS_KINDS = ("dit", "pixart", "sd3", "flux", "wan")


def tiny_diffusers(kind: str = "pixart", seed: int = 0):
    """A tiny random diffusers transformer (2 blocks, 2 heads, head_dim 8; no hub) and an input builder.

    Returns ``(model, inputs)``; ``inputs(batch=1, frames=None, text=5, timestep=500.0, seed=0)`` gives the forward
    keyword arguments of one call: ``dit`` (class-conditional, self-attention only, 4×4 patches of an 8×8 latent),
    ``pixart`` (self + cross attention to ``text`` caption tokens), ``sd3`` (joint attention, patches then text),
    ``flux`` (joint attention with text first, 2 double + 1 single block, 4×4 packed latent) and ``wan`` (video:
    ``frames`` latent frames (default 2) of 4×4 patches, 3-D RoPE, self + cross attention).

    Raises:
        ValueError: unknown ``kind`` (one of :data:`DIFFUSERS_KINDS`).
    """
    import diffusers

    torch.manual_seed(seed)
    heads, head_dim = 2, 8
    width = heads * head_dim
    if kind == "dit":
        model = diffusers.DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                                out_channels=4,
                                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                                norm_num_groups=1)
    elif kind == "pixart":
        model = diffusers.PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim,
                                                   in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=width,
                                                   sample_size=8, patch_size=2, caption_channels=12,
                                                   norm_num_groups=1)
    elif kind == "sd3":
        model = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                                attention_head_dim=head_dim, num_attention_heads=heads,
                                                joint_attention_dim=12, caption_projection_dim=width,
                                                pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8)
    elif kind == "flux":
        model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=1,
                                                 attention_head_dim=head_dim, num_attention_heads=heads,
                                                 joint_attention_dim=12, pooled_projection_dim=6,
                                                 axes_dims_rope=(2, 2, 4))
    elif kind == "wan":
        model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads,
                                                attention_head_dim=head_dim, in_channels=4, out_channels=4, text_dim=12,
                                                freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
    else:
        raise ValueError(f"expected kind in {DIFFUSERS_KINDS}, got {kind!r}")
    model.eval()

    def inputs(batch: int = 1, frames: int | None = None, text: int = 5, timestep: float = 500.0,
               seed: int = 0) -> dict:
        generator = torch.Generator().manual_seed(seed)

        def noise(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=generator)

        step = torch.full((batch,), float(timestep))
        if kind == "dit":
            return {"hidden_states": noise(batch, 4, 8, 8), "timestep": step.long(),
                    "class_labels": torch.zeros(batch, dtype=torch.long)}
        if kind == "pixart":
            return {"hidden_states": noise(batch, 4, 8, 8), "timestep": step, "encoder_hidden_states": noise(batch, text, 12),
                    "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        if kind == "sd3":
            return {"hidden_states": noise(batch, 4, 8, 8), "timestep": step, "encoder_hidden_states": noise(batch, text, 12),
                    "pooled_projections": noise(batch, 6)}
        if kind == "flux":
            rows = cols = 4
            axes = (torch.zeros(1), torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32))
            ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
            return {"hidden_states": noise(batch, rows * cols, 4), "timestep": step / 1000,
                    "encoder_hidden_states": noise(batch, text, 12), "pooled_projections": noise(batch, 6),
                    "img_ids": ids.reshape(-1, 3).float(), "txt_ids": torch.zeros(text, 3)}
        return {"hidden_states": noise(batch, 4, frames or 2, 8, 8), "timestep": step,
                "encoder_hidden_states": noise(batch, text, 12)}

    return model, inputs


def save_tiny_dit_pipeline(folder, labels: tuple[str, ...] = ("red", "blue"), seed: int = 0):
    """Save a tiny random diffusers ``DiTPipeline`` (the :func:`tiny_diffusers` ``"dit"`` transformer, a one-block
    AutoencoderKL, a DDIM scheduler, class names ``labels``) in ``folder`` and return it: a pipeline folder
    (model_index.json) that ``attnlab probe --model FOLDER --prompt red`` runs offline."""
    import json
    from pathlib import Path

    import diffusers

    transformer, _ = tiny_diffusers("dit", seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                                  norm_num_groups=4, sample_size=8)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler(),
                                 id2label=dict(enumerate(labels)))
    pipe.save_pretrained(folder)
    index = Path(folder) / "model_index.json"
    config = json.loads(index.read_text(encoding="utf-8"))
    config["id2label"] = {str(key): value for key, value in enumerate(labels)}  # DiTPipeline does not save it
    index.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
