"""attnlab.capture.architectures: one causal-LM test for the loader and the facts; provenance keys checked."""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_model_dir, tiny_bert, tiny_llama, tiny_tokenizer

from attnlab.capture.architectures import is_causal_lm, model_facts
from attnlab.capture.loading import load_model


def _tiny_roberta_mlm():
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    config = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           vocab_size=97, max_position_embeddings=64)
    return RobertaForMaskedLM(config).eval()


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64)).eval()


@pytest.mark.parametrize(("build", "causal"), [
    (_tiny_roberta_mlm, False),  # has an lm_head, but is a masked LM
    (tiny_bert, False),
    (tiny_llama, True),
    (_tiny_gpt2, True),
])
def test_one_causal_heuristic_for_models_configs_and_facts(build, causal):
    model = build()
    assert hasattr(model, "lm_head") or build is tiny_bert
    assert is_causal_lm(model) is causal
    assert model_facts(model).causal is causal
    model.config.architectures = [type(model).__name__]  # what save_pretrained writes
    assert is_causal_lm(model.config) is causal


def test_the_loader_and_the_facts_agree_on_a_saved_masked_lm(tmp_path):
    folder = save_model_dir(tmp_path / "roberta", _tiny_roberta_mlm(), tiny_tokenizer())
    loaded = load_model(folder)
    assert loaded.facts.causal is False and not type(loaded.model).__name__.endswith("ForCausalLM")


def test_unknown_provenance_keys_are_refused():
    with pytest.raises(TypeError, match="sorce"):
        model_facts(tiny_llama(), name="tiny", sorce="typo")
    assert model_facts(tiny_llama(), name="tiny", source="here").source == "here"
