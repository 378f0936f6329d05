"""The Kinetics cost model (attnlab.cost) against FLOPs and bytes counted by hand for a tiny model."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.cost import (ACCELERATORS, MODEL_FAMILIES, Accelerator, ModelSizes, attention_cost, family_sizes,
                          llama_parameters, measure_accelerator, model_from_config, prefill_cost, sizes_of)
from attnlab.errors import ConfigError, UsageError

# P = 1000 parameters, 2 layers, 4 query heads, 2 kv heads, head_dim 8: d = 16
SIZES = ModelSizes(num_parameters=1000, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


def loop_dense(L_in, L_out, N, kv_bytes=2):
    """Per decode step t (context L_in + t): weights 2P, and 4·head_dim FLOPs per (layer, query head, key); bytes:
    the prompt's K and V once per step for all samples, each sample's own generated K and V."""
    flops = bytes_ = 0.0
    for t in range(L_out):
        context = L_in + t
        flops += N * (2 * 1000 + 4 * 8 * 2 * 4 * context)
        bytes_ += kv_bytes * 2 * 8 * 2 * 2 * (L_in + N * t)  # K and V, head_dim, layers, kv heads
    return flops, bytes_


def test_dense_matches_the_papers_closed_form():
    cost = attention_cost(SIZES, prompt_len=10, gen_len=6, samples=3)
    # Kinetics: N·[2·P·L_out + 2·(2·L_in + L_out)·L_out·n_q·d], bytes 2·(2·L_in + N·L_out)·L_out·n_kv·d
    assert cost.flops == 3 * (2 * 1000 * 6 + 2 * (20 + 6) * 6 * 4 * 16)
    assert cost.bytes == 2 * (20 + 3 * 6) * 6 * 2 * 16


def test_dense_is_the_per_step_sum_up_to_the_halving_of_the_growing_context():
    """The closed form sums the context as (2·L_in + L_out)·L_out/2, the exact sum is L_in·L_out + L_out(L_out−1)/2:
    they differ by L_out/2 keys per (layer, head), which is what this checks."""
    L_in, L_out, N = 10, 6, 3
    flops, bytes_ = loop_dense(L_in, L_out, N)
    cost = attention_cost(SIZES, prompt_len=L_in, gen_len=L_out, samples=N)
    assert cost.flops - flops == N * 4 * 8 * 2 * 4 * (L_out / 2)
    assert cost.bytes - bytes_ == 2 * 2 * 8 * 2 * 2 * N * (L_out / 2)


def test_topk_and_sliding_window_by_hand():
    # B = 4 + 2·3 = 10 > L_in = 6: K = 10·5 − ½·(10 − 6)² = 42; search ⌊(12 + 5)/2⌋·5·4·16 = 8·320
    kept = sum(min(10, 6 + t) for t in range(5))  # keys actually read per (layer, head), step by step: 40
    assert kept == 42 - 0.5 * (10 - 6)  # the continuous closed form over-counts by ½·(B − L_in) keys
    cost = attention_cost(SIZES, prompt_len=6, gen_len=5, samples=2, attention="topk", block_size=2, top_k=3, local=4)
    assert cost.flops == 2 * (2 * 1000 * 5 + 4 * 42 * 4 * 16 + 8 * 5 * 4 * 16)
    assert cost.bytes == 2 * 2 * 42 * 2 * 16 * 2 + 1 * ((12 + 10) // 2) * 5 * 2 * 16
    window = attention_cost(SIZES, prompt_len=100, gen_len=5, attention="sliding_window", window=8)
    assert window.flops == 2 * 1000 * 5 + 4 * (8 * 5) * 4 * 16  # B ≤ L_in: every step reads 8 keys
    assert window.bytes == 2 * 2 * (8 * 5) * 2 * 16


def test_a_window_longer_than_the_context_costs_what_dense_costs_in_the_same_approximation():
    dense = attention_cost(SIZES, prompt_len=0, gen_len=64, attention="dense")
    window = attention_cost(SIZES, prompt_len=0, gen_len=64, attention="sliding_window", window=64)
    assert window.flops == dense.flops  # K = B·L_out − B²/2 = L_out²/2, the dense (2·0 + L_out)·L_out/2


def test_linear_state_cost_and_weights_by_hand():
    cost = attention_cost(SIZES, prompt_len=50, gen_len=3, samples=2, attention="linear", weight_bytes=4)
    state = 4 * 8 * 16  # heads × head_dim × head_dim × layers
    assert cost.flops == 2 * (2 * 1000 * 3 + 4 * 3 * state)
    assert cost.bytes == 2 * 2 * 2 * 3 * state + 4 * 1000 * 3 * 2


def test_efflops_and_time():
    device = Accelerator("toy", peak_flops=100.0, bandwidth=10.0)
    cost = attention_cost(SIZES, prompt_len=4, gen_len=2)
    assert device.intensity == 10.0
    assert cost.efflops(device) == cost.flops + 10.0 * cost.bytes
    assert cost.seconds(device) == pytest.approx(cost.flops / 100.0 + cost.bytes / 10.0)
    assert ACCELERATORS["b200"].intensity == pytest.approx(562.5)  # Kinetics' setting


def test_long_generation_makes_kv_traffic_dominate():
    """Kinetics' qualitative finding on a Qwen3-0.6B-like shape: at long generation the KV memory term outgrows the
    compute (eFLOPs share of I·bytes rises with L_out), and top-k sparse attention cuts it."""
    qwen = ModelSizes(num_parameters=600_000_000, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128)
    h100 = ACCELERATORS["h100"]
    share = [h100.intensity * c.bytes / c.efflops(h100) for c in
             (attention_cost(qwen, prompt_len=1024, gen_len=n, samples=8) for n in (1024, 8192, 32768))]
    assert share[0] < share[1] < share[2] and share[2] > 0.5
    dense = attention_cost(qwen, prompt_len=1024, gen_len=32768, samples=8)
    sparse = attention_cost(qwen, prompt_len=1024, gen_len=32768, samples=8, attention="topk")
    # KV budget 128 + 16·256 = 4224 keys against a mean context of 1024 + 32768/2 = 17408, plus block
    # representatives (1/16 of the dense keys): about a third of the dense traffic (measured 3.6× less eFLOPs)
    assert sparse.efflops(h100) < dense.efflops(h100) / 3


@pytest.mark.parametrize("kwargs, match", [({"gen_len": 0}, "gen_len"), ({"samples": 0}, "samples"),
                                           ({"prompt_len": -1}, "prompt_len"), ({"attention": "radial"}, "attention"),
                                           ({"attention": "topk", "block_size": 0}, "block_size"),
                                           ({"kv_bytes": -2}, "kv_bytes"), ({"weight_bytes": -1}, "weight_bytes")])
def test_bad_input_is_one_line(kwargs, match):
    args = {"prompt_len": 4, "gen_len": 2, **kwargs}
    with pytest.raises(ConfigError, match=match):
        attention_cost(SIZES, **args)


def test_a_budget_past_the_whole_context_is_dense_not_negative():
    dense = attention_cost(SIZES, prompt_len=10, gen_len=6)
    huge = attention_cost(SIZES, prompt_len=10, gen_len=6, attention="sliding_window", window=10_000)
    assert huge.flops == dense.flops and huge.bytes == dense.bytes
    topk = attention_cost(SIZES, prompt_len=10, gen_len=6, attention="topk", block_size=16, top_k=256)
    assert topk.bytes > 0 and topk.flops > dense.flops  # every key, plus the block search


def test_prefill_by_hand():
    """Every weight but the head on each prompt token, the head on the last one, QKᵀ and AV over the causal
    triangle; bytes: every weight once and the K and V written."""
    pre = prefill_cost(SIZES, prompt_len=10, samples=2, kv_bytes=4, weight_bytes=4, head_parameters=100)
    pairs = sum(1 for q in range(10) for k in range(10) if k <= q)  # causal (query, key) pairs, counted: 55
    attended = pairs - 10 / 2  # the cost model's L²/2 leaves out half the diagonal, as the decode form does
    assert pre.flops == 2 * (2 * 900 * 10 + 2 * 100 + 4 * attended * 4 * 16)
    assert pre.bytes == 4 * 1000 + 4 * 2 * 2 * 10 * 2 * 16


def test_batched_samples_share_the_weight_reads():
    alone = attention_cost(SIZES, prompt_len=8, gen_len=4, samples=3, weight_bytes=4)
    batched = attention_cost(SIZES, prompt_len=8, gen_len=4, samples=3, weight_bytes=4, batched=True)
    assert alone.bytes - batched.bytes == 4 * 1000 * 4 * (3 - 1) and alone.flops == batched.flops
    one = attention_cost(SIZES, prompt_len=8, gen_len=4, weight_bytes=4)
    assert attention_cost(SIZES, prompt_len=8, gen_len=4, weight_bytes=4, batched=True) == one


def test_model_families_from_their_configs():
    smollm2 = MODEL_FAMILIES["smollm2"]
    assert smollm2["135m"] == ModelSizes(134_515_008, 30, 9, 3, 64)  # the bundled model's loaded count
    assert smollm2["360m"].num_parameters == 361_821_120 and smollm2["1.7b"].num_parameters == 1_711_376_384
    assert smollm2["1.7b"].num_kv_heads == smollm2["1.7b"].num_heads  # 1.7B has no GQA: 10× the KV of 360M/token
    assert llama_parameters(hidden_size=4, intermediate_size=6, num_layers=2, num_heads=2, num_kv_heads=1,
                            head_dim=2, vocab_size=10, tied_embeddings=False) == (
        2 * (4 * 2 * (4 + 2) + 3 * 4 * 6 + 2 * 4) + 4 + 2 * 10 * 4)
    for family in MODEL_FAMILIES.values():
        for sizes in family.values():
            assert sizes.num_heads % sizes.num_kv_heads == 0


def test_measured_accelerator_is_an_accelerator():
    """Times a tiny matmul and matvec; checks the result's form only (tests never judge a timing)."""
    device = measure_accelerator(matmul_size=16, stream_mib=1, repeats=1, name="here")
    assert device.name == "here" and device.peak_flops > 0 and device.bandwidth > 0 and "matvec" in device.note
    assert "cpu2" in ACCELERATORS and ACCELERATORS["cpu2"].intensity > 1  # a CPU is compute-rich per byte too


@pytest.mark.parametrize("call, match", [
    (lambda: measure_accelerator(matmul_size=0), "matmul_size"),
    (lambda: measure_accelerator(repeats=0), "repeats"),
    (lambda: prefill_cost(SIZES, prompt_len=0), "prompt_len"),
    (lambda: prefill_cost(SIZES, prompt_len=4, head_parameters=2000), "head_parameters"),
])
def test_bad_measure_and_prefill_input_is_one_line(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


# --- the Python API takes what users have at hand (WALK13 #9, #10, #11, #1) ---


def test_integral_types_scalars_and_accelerator_names():
    """numpy integers are ints; an axis can be one value; accelerators can be named; the rows are the same."""
    np = pytest.importorskip("numpy")
    from attnlab.cost import cost_table

    assert attention_cost(SIZES, prompt_len=np.int64(10), gen_len=np.int32(6), samples=np.int64(3)) == (
        attention_cost(SIZES, prompt_len=10, gen_len=6, samples=3))
    scalar = cost_table(SIZES, prompt_lens=np.int64(10), gen_lens=6, samples=2, attentions="topk",
                        accelerators="h100", batched=True)
    tupled = cost_table(SIZES, prompt_lens=(10,), gen_lens=(6,), samples=(2,), attentions=("topk",),
                        accelerators=(ACCELERATORS["h100"],), batched=True)
    assert scalar == tupled and len(scalar) == 1 and type(scalar[0]["prompt_len"]) is int
    both = cost_table(SIZES, prompt_lens=np.array([4, 10]), gen_lens=[6], accelerators=["cpu2", ACCELERATORS["b200"]])
    assert [(row["prompt_len"], row["accelerator"]) for row in both] == [(4, "cpu2"), (4, "b200"), (10, "cpu2"),
                                                                          (10, "b200")]


@given(prompt_len=st.integers(0, 5000), gen_len=st.integers(1, 5000), samples=st.integers(1, 16),
       attention=st.sampled_from(["dense", "topk", "sliding_window", "linear"]))
@settings(max_examples=40, deadline=None)
def test_a_table_row_is_the_attention_cost_of_its_cell(prompt_len, gen_len, samples, attention):
    from attnlab.cost import cost_table

    (row,) = cost_table(SIZES, prompt_lens=prompt_len, gen_lens=gen_len, samples=samples, attentions=attention,
                        accelerators="h200", weight_bytes=4)
    cost = attention_cost(SIZES, prompt_len=prompt_len, gen_len=gen_len, samples=samples, attention=attention,
                          weight_bytes=4)
    assert (row["flops"], row["bytes"]) == (cost.flops, cost.bytes)
    assert row["seconds"] == cost.seconds(ACCELERATORS["h200"])


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt_lens": ()}, "at least one value in prompt_lens"),
    ({"gen_lens": []}, "at least one value in gen_lens"),
    ({"attentions": ()}, "at least one value in attentions"),
    ({"accelerators": ()}, "at least one value in accelerators"),
    ({"prompt_lens": 1.5}, "prompt_lens as one value or a sequence"),
    ({"accelerators": ("tpu",)}, "accelerators among b200"),
    ({"bogus": 3}, "unknown option.*bogus"),
    ({"kv_bytes": math.inf}, r"^expected kv_bytes as a finite number > 0, got inf$"),
    ({"weight_bytes": math.inf}, r"^expected weight_bytes as a finite number >= 0, got inf$"),
    ({"kv_bytes": math.nan}, "kv_bytes"),
    ({"samples": (0,)}, r"^expected samples as an int >= 1, got 0$"),
])
def test_bad_table_input_is_a_config_error(kwargs, match):
    from attnlab.cost import cost_table

    with pytest.raises(ConfigError, match=match):
        cost_table(SIZES, **{"prompt_lens": (4,), "gen_lens": (2,), **kwargs})


def test_prefill_names_the_one_bad_value():
    with pytest.raises(ConfigError, match=r"^expected weight_bytes as a finite number >= 0, got inf$"):
        prefill_cost(SIZES, prompt_len=4, weight_bytes=math.inf)


def test_families_by_name():
    assert family_sizes("qwen3-8b") == family_sizes("Qwen3-8B") == MODEL_FAMILIES["qwen3"]["8b"]
    assert family_sizes("smollm2-1.7b") == MODEL_FAMILIES["smollm2"]["1.7b"]
    with pytest.raises(ConfigError, match="family among smollm2-135m.*got 'qwen3-9b'"):
        family_sizes("qwen3-9b")


def test_sizes_of_a_loaded_model_a_model_and_facts(tmp_path):
    """sizes_of counts the parameters itself for a LoadedModel or a model (tied weights once); a ModelFacts needs the
    count; model_from_config builds the same model without weights (config.json alone: no tokenizer, no weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnlab.capture.architectures import model_facts
    from attnlab.capture.loading import LoadedModel

    config = LlamaConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=50, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    want = ModelSizes(count, 3, 6, 2, 4)
    assert count == llama_parameters(hidden_size=24, intermediate_size=40, num_layers=3, num_heads=6,
                                     num_kv_heads=2, head_dim=4, vocab_size=50, tied_embeddings=False)
    loaded = LoadedModel(model, None, model_facts(model))
    assert sizes_of(loaded) == sizes_of(model) == sizes_of(loaded.facts, count) == want
    assert sizes_of(loaded, 7).num_parameters == 7
    config.save_pretrained(tmp_path)  # config.json only
    for where in (tmp_path, tmp_path / "config.json", config):
        built = model_from_config(where)
        assert sizes_of(built) == want and next(built.parameters()).is_meta
    with pytest.raises(ConfigError, match="needs num_parameters"):
        sizes_of(loaded.facts)
    with pytest.raises(ConfigError, match="expected a LoadedModel, a transformers model or a ModelFacts, got str"):
        sizes_of("smollm2-135m")


def test_model_from_config_of_a_tinylm(tmp_path):
    from attnlab.lab.modeling import TinyLMSpec, build_model

    model = build_model(TinyLMSpec(layer="gla", vocab_size=32, num_layers=2, hidden_size=16, num_heads=4), seed=0)
    model.save_pretrained(tmp_path)
    built = model_from_config(tmp_path / "config.json")
    assert sizes_of(built) == sizes_of(model) and built.config.layer == "gla"


def test_model_from_config_errors_are_one_line(tmp_path):
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(UsageError, match=r"has no config.json; did you mean .*run/checkpoint\?"):
        model_from_config(tmp_path / "run")
    with pytest.raises(UsageError, match="has no config.json; expected a model folder"):
        model_from_config(tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        model_from_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    for text, match in (("{", "cannot read"), ("[1]", "not a transformers config"),
                        ('{"model_type": "nonsense"}', "got model_type 'nonsense'")):
        bad.write_text(text)
        with pytest.raises(UsageError, match=match) as caught:
            model_from_config(bad)
        assert "\n" not in str(caught.value)


def test_measured_note_says_1_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        device = measure_accelerator(matmul_size=8, stream_mib=1, repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert device.note.endswith("; 1 thread")


def test_model_from_config_counts_a_tied_head_once(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=50, tie_word_embeddings=True,
                         architectures=["LlamaForCausalLM"])
    assert sizes_of(model_from_config(config)).num_parameters == llama_parameters(
        hidden_size=24, intermediate_size=40, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=4, vocab_size=50,
        tied_embeddings=True)


def test_cost_validation_render_of_a_missing_or_foreign_file_is_one_line(tmp_path, capsys):
    """``benchmarks/cost_validation.py --render`` with a bad file: one line on stderr, exit 2 (WALK13 #5)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cost_validation.py"
    spec = importlib.util.spec_from_file_location("cost_validation", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"a": 1}')
    for path, message in ((tmp_path / "missing.json", "does not exist"), (foreign, "not a JSON written by")):
        assert module.main(["--render", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
