"""Tiny random transformers models built from configs (no network), shared by the tests."""

from __future__ import annotations

import torch


def tiny_llama(num_heads: int = 4, num_kv_heads: int = 2, layers: int = 2, seed: int = 0, vocab_size: int = 97,
               max_positions: int = 128, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=num_heads * 8, num_hidden_layers=layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, intermediate_size=64, vocab_size=vocab_size,
                         max_position_embeddings=max_positions, attn_implementation="sdpa", **extra)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=97, max_position_embeddings=64, attn_implementation="sdpa")
    return BertModel(config).eval()


def tiny_qwen2_sliding(window: int = 4, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=97, max_position_embeddings=128, use_sliding_window=True,
                         sliding_window=window, max_window_layers=0, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).eval()


WORDS = "the cat sat on a mat and the dog ran to it while birds sang over green hills far away".split()


def tiny_tokenizer(add_bos: bool = False, with_bos: bool = True):
    """Word-level tokenizer over WORDS (+ specials); ``add_bos`` makes it prepend <s> like Llama-2 tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    specials = {"bos_token": "<s>", "eos_token": "</s>"} if with_bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **specials)


def byte_tokenizer():
    """One token per UTF-8 byte (ids 0..255, no special tokens): any text is readable; pair with
    ``tiny_llama(vocab_size=256)``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_model_dir(folder, model, tokenizer=None):
    """Save a tiny model and a tiny tokenizer as a local HF folder (safetensors) and return the folder."""
    model.save_pretrained(folder)
    (tokenizer or tiny_tokenizer()).save_pretrained(folder)
    return folder


def tiny_gpt_oss(seed: int = 0):
    """GPT-OSS: learned per-head sink logits (``s_aux``), which attnlab refuses rather than ignores."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    config = GptOssConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, intermediate_size=32, num_local_experts=2, num_experts_per_tok=1,
                          vocab_size=97, max_position_embeddings=64, sliding_window=8,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          attn_implementation="eager")
    return GptOssForCausalLM(config).eval()
