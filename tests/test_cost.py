"""The Kinetics cost model (attnlab.cost) against FLOPs and bytes counted by hand for a tiny model."""

from __future__ import annotations

import pytest

from attnlab.cost import (ACCELERATORS, MODEL_FAMILIES, Accelerator, ModelSizes, attention_cost, llama_parameters,
                          measure_accelerator, prefill_cost)
from attnlab.errors import ConfigError

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
