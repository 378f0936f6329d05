"""Head outputs and a head-level analysis on the families whose output projection ``ModelRunner`` reads besides
Llama and GPT-2 (``attnlab.capture.runner.OUTPUT_PROJECTIONS``): GPT-J, Phi-1/2, OPT and GPT-NeoX. Known answers come
from HF's eager attention weights times the value projection's output, and from zeroing a head's input columns of
the output projection's weight."""

from __future__ import annotations

import copy

import pytest
import torch

from attnlab.capture.runner import ModelRunner

H, D = 4, 8
IDS = torch.tensor([[5, 9, 11, 3, 17, 21, 8, 30, 12, 6], [7, 2, 19, 4, 12, 25, 40, 41, 2, 9]])


def gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(n_layer=2, n_head=H, n_embd=H * D, rotary_dim=4, vocab_size=97, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPTJForCausalLM(config), lambda m: m.transformer.h, "attn.v_proj", "attn.out_proj"


def phi():
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(hidden_size=H * D, num_hidden_layers=2, num_attention_heads=H, intermediate_size=64,
                       vocab_size=97, max_position_embeddings=64)
    return PhiForCausalLM(config), lambda m: m.model.layers, "self_attn.v_proj", "self_attn.dense"


def opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=H * D, num_hidden_layers=2, num_attention_heads=H, ffn_dim=64, vocab_size=97,
                       max_position_embeddings=64, word_embed_proj_dim=H * D, pad_token_id=1)
    return OPTForCausalLM(config), lambda m: m.model.decoder.layers, "self_attn.v_proj", "self_attn.out_proj"


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(hidden_size=H * D, num_hidden_layers=2, num_attention_heads=H, intermediate_size=64,
                           vocab_size=97, max_position_embeddings=64)
    # query_key_value's output is (B, L, H, 3·D) per head: query, key, value
    return GPTNeoXForCausalLM(config), lambda m: m.gpt_neox.layers, "attention.query_key_value", "attention.dense"


FAMILIES = {"gptj": gptj, "phi": phi, "opt": opt, "gpt_neox": gpt_neox}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    model, blocks, value_path, out_path = FAMILIES[request.param]()
    model.set_attn_implementation("sdpa")
    return request.param, model.eval(), blocks, value_path, out_path


def _batch(ids):
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_the_runner_reads_head_outputs_before_the_output_projection(family):
    """Head outputs = HF eager probs × the value projection's output, per head (independent of attnlab)."""
    name, model, blocks, value_path, _ = family
    record = ModelRunner(model).forward(_batch(IDS), head_outputs=True)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    values = {}
    hooks = [block.get_submodule(value_path).register_forward_hook(lambda m, a, out, i=i: values.__setitem__(i, out))
             for i, block in enumerate(blocks(eager))]
    try:
        with torch.no_grad():
            attentions = eager(**_batch(IDS), output_attentions=True).attentions
    finally:
        for hook in hooks:
            hook.remove()
    for layer in range(2):
        value = values[layer].view(2, 10, H, -1)[..., -D:]  # GPT-NeoX: the last third of each head's q/k/v
        expected = (attentions[layer].double() @ value.transpose(1, 2).double()).transpose(1, 2)  # (B, L, H, D)
        torch.testing.assert_close(record.head_outputs[layer].double(), expected, atol=1e-5, rtol=0)


def test_head_importance_equals_zeroing_the_heads_output_projection_columns(family):
    from attnlab.analyses.head_importance import HeadImportanceAnalysis

    name, model, blocks, _, out_path = family
    runner = ModelRunner(model)
    importance = HeadImportanceAnalysis(top_k=3)
    importance.prepare(runner.facts, runner)
    importance.observe(runner, _batch(IDS))
    ablated = copy.deepcopy(model)
    with torch.no_grad():  # nn.Linear weight (out, in): head 2's inputs are columns 2·D…3·D-1
        blocks(ablated)[1].get_submodule(out_path).weight[:, 2 * D : 3 * D] = 0
    base, edited = runner.forward(_batch(IDS)).mean_loss(), ModelRunner(ablated).forward(_batch(IDS)).mean_loss()
    assert abs(importance.importance()[1, 2].item()) > 1e-6
    assert importance.importance()[1, 2].item() == pytest.approx(float((edited - base).mean()), rel=1e-4, abs=1e-7)


def test_a_family_without_the_attention_interface_is_refused_in_one_line():
    """GPT-Neo's output projection is not read: head edits could not run there (no AttentionInterface) anyway."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from attnlab.errors import UnsupportedModelError

    config = GPTNeoConfig(num_layers=2, num_heads=H, hidden_size=H * D, attention_types=[[["global", "local"], 1]],
                          vocab_size=97, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    model = GPTNeoForCausalLM(config).eval()
    with pytest.raises(UnsupportedModelError, match="GPT-J- and Phi-style blocks.*AttentionInterface") as info:
        ModelRunner(model).forward(_batch(IDS), head_outputs=True)
    assert "\n" not in str(info.value)
