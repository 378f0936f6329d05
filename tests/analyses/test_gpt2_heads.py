"""Head-level analyses and head edits on GPT-2-style blocks, whose projections are transformers' Conv1D (``c_attn``
fused q/k/v, ``c_proj`` the output projection). Known answers come from HF's eager attention weights and the
Conv1D weights themselves."""

from __future__ import annotations

import copy

import pytest
import torch

from attnlab import Session
from attnlab.capture.head_record import record_head_means, record_head_outputs
from attnlab.capture.runner import ModelRunner
from attnlab.edits import EDITS
from attnlab.errors import UnsupportedModelError
from attnlab.testing import MODEL_LOGITS_ATOL
from tiny_models import WORDS, save_model_dir

H, D = 4, 8
IDS = torch.tensor([[5, 9, 11, 3, 17, 21, 8, 30, 12, 6], [7, 2, 19, 4, 12, 25, 40, 41, 2, 9]])


def tiny_gpt2(seed: int = 0, attn_implementation: str = "sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=H, n_embd=H * D, vocab_size=97, n_positions=64, bos_token_id=0,
                        eos_token_id=0, attn_implementation=attn_implementation)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def _batch(ids):
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_the_runner_reads_gpt2_head_outputs_before_c_proj(gpt2):
    """Head outputs = HF eager probs × the value third of c_attn's output, per head (independent of attnlab)."""
    record = ModelRunner(gpt2).forward(_batch(IDS), head_outputs=True)
    eager = copy.deepcopy(gpt2)
    eager.set_attn_implementation("eager")
    fused = {}
    hooks = [block.attn.c_attn.register_forward_hook(lambda m, a, out, i=i: fused.__setitem__(i, out))
             for i, block in enumerate(eager.transformer.h)]
    with torch.no_grad():
        attentions = eager(input_ids=IDS, output_attentions=True).attentions
    for hook in hooks:
        hook.remove()
    for layer in range(2):
        value = fused[layer].split(H * D, dim=-1)[2].view(2, 10, H, D).transpose(1, 2)  # (B, H, L, D)
        expected = (attentions[layer].double() @ value.double()).transpose(1, 2)  # (B, L, H, D)
        torch.testing.assert_close(record.head_outputs[layer].double(), expected, atol=1e-5, rtol=0)


def test_a_subclass_of_transformers_conv1d_is_read_as_the_output_projection(gpt2):
    """Conv1D is recognised by type, not by class name (a wrapped or quantised subclass keeps working)."""
    from transformers.pytorch_utils import Conv1D

    class WrappedConv1D(Conv1D):
        pass

    wrapped = copy.deepcopy(gpt2)
    for block in wrapped.transformer.h:
        old = block.attn.c_proj
        block.attn.c_proj = WrappedConv1D(old.nf, old.weight.shape[0])
        block.attn.c_proj.load_state_dict(old.state_dict())
    got = ModelRunner(wrapped).forward(_batch(IDS), head_outputs=True).head_outputs
    want = ModelRunner(gpt2).forward(_batch(IDS), head_outputs=True).head_outputs
    for layer in range(2):
        torch.testing.assert_close(got[layer], want[layer], atol=0, rtol=0)


def test_head_importance_and_divergence_run_on_gpt2(gpt2):
    from attnlab.analyses.head_divergence import HeadDivergenceAnalysis
    from attnlab.analyses.head_importance import HeadImportanceAnalysis

    runner = ModelRunner(gpt2)
    importance, divergence = HeadImportanceAnalysis(top_k=3), HeadDivergenceAnalysis(context=4)
    for probe in (importance, divergence):
        probe.prepare(runner.facts, runner)
        probe.observe(runner, _batch(IDS))
    assert len([r for r in divergence.rows() if r["statistic"] == "divergence"]) == 2 * H
    # independent: ablate head 2 of layer 1 by zeroing its rows of c_proj's (in, out) Conv1D weight
    ablated = copy.deepcopy(gpt2)
    with torch.no_grad():
        ablated.transformer.h[1].attn.c_proj.weight[2 * D : 3 * D] = 0
    base, edited = runner.forward(_batch(IDS)).mean_loss(), ModelRunner(ablated).forward(_batch(IDS)).mean_loss()
    assert importance.importance()[1, 2].item() == pytest.approx(float((edited - base).mean()), rel=1e-4, abs=1e-7)


def test_head_level_probes_end_to_end_on_a_gpt2_folder(tmp_path):
    from attnlab.pipeline import RunConfig, run_probes

    folder = save_model_dir(tmp_path / "gpt2", tiny_gpt2())
    text = tmp_path / "text.txt"
    rng = torch.Generator().manual_seed(0)
    text.write_text(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (300,), generator=rng)))
    probes = ("head_divergence", "head_importance", "head_overlap", "active_dormant")
    results = run_probes(RunConfig(model=str(folder), text=str(text), seq_len=24, max_windows=2, probes=probes,
                                   bos="never", probe_args={"head_overlap": {"top_k": 2}}))
    assert {r["probe"] for r in results["rows"]} == set(probes)


def test_head_patch_and_mean_ablation_on_gpt2_equal_a_c_proj_oracle(gpt2):
    other = IDS.flip(-1)
    source = record_head_outputs(gpt2, other, layers=[1], heads=[0, 2])
    means = record_head_means(gpt2, [other])
    seen = {}

    def read(module, args):
        seen["x"] = args[0].detach().view(2, 10, H, D)

    def write(module, args):
        x = args[0].clone().view(2, 10, H, D)
        x[:, :, [0, 2]] = seen["other"][:, :, [0, 2]]
        x[:, :, 3] = seen["other"][:, :, 3].reshape(-1, D).mean(0)
        return (x.flatten(2),)

    c_proj = gpt2.transformer.h[1].attn.c_proj
    hook = c_proj.register_forward_pre_hook(read)
    with torch.no_grad():
        gpt2(input_ids=other)
    hook.remove()
    seen["other"] = seen["x"]
    hook = c_proj.register_forward_pre_hook(write)
    with torch.no_grad():
        expected = gpt2(input_ids=IDS).logits
    hook.remove()
    edits = [EDITS.get("head_patch").from_source(source),
             EDITS.get("mean_ablation").from_means(means, layers=[1], heads=[3])]
    with torch.no_grad(), Session(gpt2, edits=edits) as session:
        got = gpt2(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, atol=MODEL_LOGITS_ATOL, rtol=0)
    assert list(session.edit_report().calls_touched) == [1, 1]


def test_qkv_capture_refuses_gpt2_in_one_line(gpt2):
    """q/k/v capture re-derives Llama's rotary from q/k/v_proj; GPT-2's fused c_attn is refused by name."""
    from attnlab.capture.qkv import capture_qkv

    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel") as info:
        capture_qkv(gpt2, IDS, 0)
    assert "\n" not in str(info.value)
