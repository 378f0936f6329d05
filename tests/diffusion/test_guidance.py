"""Guidance combinations on hand-made tensors; the SoftPAG predictor on a tiny random PixArt transformer."""

from __future__ import annotations

import pytest
import torch

from attnlab.diffusion.guidance import cfg, cfg_perturbation_guidance, perturbation_guidance
from attnlab.errors import ConfigError, ShapeError

# values where the formula's rounding would show: 1e8 + 1·(1 - 1e8) is 0.0 in float32, not 1.0
UNCOND = torch.tensor([[1e8, -2.0], [0.5, 3.0]])
COND = torch.tensor([[1.0, 4.0], [-0.5, 3.0]])
PERTURBED = torch.tensor([[2.0, 1.0], [0.5, -1.0]])


def test_cfg_by_hand():
    # 1 + 2·(3 - 1) = 5; -1 + 2·(0 - (-1)) = 1
    out = cfg(torch.tensor([1.0, -1.0]), torch.tensor([3.0, 0.0]), 2.0)
    assert out.tolist() == [5.0, 1.0]


def test_cfg_scale_one_is_exactly_cond_and_zero_is_uncond():
    assert torch.equal(cfg(UNCOND, COND, 1.0), COND)
    assert torch.equal(cfg(None, COND, 1), COND)
    assert torch.equal(cfg(UNCOND, COND, 0.0), UNCOND)


def test_perturbation_guidance_by_hand_and_w_zero_is_exactly_pred():
    # 1 + 3·(1 - 2) = -2; 4 + 3·(4 - 1) = 13; -0.5 + 3·(-0.5 - 0.5) = -3.5; 3 + 3·(3 - (-1)) = 15
    assert perturbation_guidance(COND, PERTURBED, 3.0).tolist() == [[-2.0, 13.0], [-3.5, 15.0]]
    assert torch.equal(perturbation_guidance(COND, PERTURBED, 0.0), COND)
    assert torch.equal(perturbation_guidance(COND, None, 0), COND)


def test_combination_by_hand_and_its_limits():
    uncond = torch.tensor([0.0, 1.0])
    cond = torch.tensor([2.0, 1.0])
    perturbed = torch.tensor([1.0, 3.0])
    # 0 + 1.5·(2 - 0) + 2·(2 - 1) = 5; 1 + 1.5·0 + 2·(1 - 3) = -3
    assert cfg_perturbation_guidance(uncond, cond, perturbed, 1.5, 2.0).tolist() == [5.0, -3.0]
    assert torch.equal(cfg_perturbation_guidance(UNCOND, COND, PERTURBED, 1.0, 3.0),
                       perturbation_guidance(COND, PERTURBED, 3.0))
    assert torch.equal(cfg_perturbation_guidance(UNCOND, COND, None, 4.0, 0.0), cfg(UNCOND, COND, 4.0))


def test_combination_is_the_same_in_eps_and_velocity():
    # flow matching x_t = (1-t)·x0 + t·ε, v = ε - x0, so ε = x_t + (1-t)·v: guiding v then converting = guiding ε
    gen = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(3, 4, generator=gen), 0.3
    v_u, v_c, v_p = (torch.randn(3, 4, generator=gen) for _ in range(3))
    to_eps = lambda v: x_t + (1 - t) * v  # noqa: E731
    guided_v = cfg_perturbation_guidance(v_u, v_c, v_p, 2.5, 1.5)
    guided_eps = cfg_perturbation_guidance(to_eps(v_u), to_eps(v_c), to_eps(v_p), 2.5, 1.5)
    torch.testing.assert_close(to_eps(guided_v), guided_eps)


@pytest.mark.parametrize("call, error, message", [
    (lambda: cfg(None, COND, 2.0), ConfigError, r"^cfg_scale=2.0 needs the unconditional prediction, got None$"),
    (lambda: perturbation_guidance(COND, None, 1.0), ConfigError, r"^scale=1.0 needs the perturbed prediction"),
    (lambda: cfg(UNCOND, COND, float("nan")), ConfigError, r"^cfg_scale must be a finite number, got nan$"),
    (lambda: perturbation_guidance(COND, PERTURBED[:1], 1.0), ShapeError,
     r"^guidance branches must have one shape, got pred \(2, 2\), perturbed \(1, 2\)$"),
])
def test_bad_inputs(call, error, message):
    with pytest.raises(error, match=message):
        call()


# the SoftPAG predictor on a tiny random PixArt (2 blocks: layers 0 self, 1 cross, 2 self, 3 cross; 2 heads) -------
@pytest.fixture(scope="module")
def pixart():
    from attnlab.testing import tiny_diffusers

    model, inputs = tiny_diffusers("pixart", seed=0)
    kwargs = inputs(batch=2)
    null = torch.zeros_like(kwargs["encoder_hidden_states"])

    def forward(x, t, cond):
        with torch.no_grad():
            return model(**{**kwargs, "hidden_states": x, "timestep": t, "encoder_hidden_states": cond},
                         return_dict=False)[0]

    return model, forward, kwargs, null


def plain(pixart):
    model, forward, kwargs, null = pixart
    return forward(kwargs["hidden_states"], kwargs["timestep"], kwargs["encoder_hidden_states"])


def guided(pixart, heads, **options):
    from attnlab.diffusion.guidance import softpag_predictor

    model, forward, kwargs, null = pixart
    predict = softpag_predictor(model, heads, forward=forward, null_cond=null, **options)
    return predict(kwargs["hidden_states"], kwargs["timestep"], kwargs["encoder_hidden_states"])


def test_perturbable_heads_are_the_self_attention_heads(pixart):
    from attnlab.diffusion.guidance import perturbable_heads

    assert perturbable_heads(pixart[0]) == [(0, 0), (0, 1), (2, 0), (2, 1)]


@pytest.mark.parametrize("options", [{"alpha": 0.0, "scale": 3.0}, {"alpha": 1.0, "scale": 0.0}])
def test_alpha_zero_or_w_zero_is_bit_identical_to_the_plain_prediction(pixart, options):
    assert torch.equal(guided(pixart, [(0, 1), (2, 0)], **options), plain(pixart))
    assert torch.equal(guided(pixart, [], alpha=1.0, scale=3.0), plain(pixart))


def test_alpha_zero_with_cfg_is_exactly_cfg(pixart):
    model, forward, kwargs, null = pixart
    cond = plain(pixart)
    uncond = forward(kwargs["hidden_states"], kwargs["timestep"], null)
    expected = uncond + 2.5 * (cond - uncond)
    assert torch.equal(guided(pixart, [(0, 0)], alpha=0.0, scale=3.0, cfg_scale=2.5), expected)
    assert not torch.equal(expected, cond)


def pag_reference(pixart, layer_module):
    """The perturbed prediction from diffusers' own PAG processor (identity attention on every head of one layer):
    it runs the normal path on the first half of the batch and the identity path on the second half."""
    from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0

    model, forward, kwargs, null = pixart
    module = model.get_submodule(layer_module)
    original = module.processor
    module.set_processor(PAGIdentitySelfAttnProcessor2_0())
    try:
        doubled = {key: torch.cat([value, value]) if torch.is_tensor(value) and value.dim() > 0 else value
                   for key, value in kwargs.items()}
        with torch.no_grad():
            out = model(**doubled, return_dict=False)[0]
    finally:
        module.set_processor(original)
    return out[kwargs["hidden_states"].shape[0]:]


def test_alpha_one_on_a_whole_layer_is_diffusers_pag(pixart):
    cond = plain(pixart)
    perturbed = pag_reference(pixart, "transformer_blocks.1.attn1")  # layer 2
    out = guided(pixart, [(2, 0), (2, 1)], alpha=1.0, scale=2.0)
    torch.testing.assert_close(out, cond + 2.0 * (cond - perturbed), atol=1e-5, rtol=1e-5)
    assert (out - cond).abs().max() > 1e-3


def test_alpha_one_on_one_head_changes_the_prediction_by_that_head_only(pixart):
    cond = plain(pixart)
    one = guided(pixart, [(0, 1)], alpha=1.0, scale=2.0)
    both = guided(pixart, [(0, 0), (0, 1)], alpha=1.0, scale=2.0)
    assert (one - cond).abs().max() > 1e-4 and (both - one).abs().max() > 1e-4


def test_soft_alpha_mixes_the_attention_output_linearly(pixart):
    # at the first perturbed module (inputs upstream unchanged), SoftPAG's output is (1-α)·plain + α·identity,
    # and to_out is affine, so the module output is the same mix of diffusers' plain and PAG outputs
    from attnlab.diffusion import DiffusionSession
    from attnlab.diffusion.guidance import softpag_edits

    model, forward, kwargs, null = pixart
    module = model.get_submodule("transformer_blocks.0.attn1")
    seen = []
    hook = module.register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        plain(pixart)
        pag_reference(pixart, "transformer_blocks.0.attn1")
        with DiffusionSession(model, edits=softpag_edits([(0, 0), (0, 1)], 0.3)):
            plain(pixart)
    finally:
        hook.remove()
    plain_out, pag_out, soft_out = seen[0], seen[1][kwargs["hidden_states"].shape[0]:], seen[2]
    torch.testing.assert_close(soft_out, 0.7 * plain_out + 0.3 * pag_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads, message", [
    ([(0, 2)], r"^head \(0, 2\): layer 0 has 2 heads \(0…1\), got head 2$"),
    ([(4, 0)], r"^head \(4, 0\): the model has 4 attention layers \(0…3\), got layer 4$"),
    ([(1, 0)], r"^head \(1, 0\): layer 1 is cross attention; SoftPAG perturbs self or joint attention only"),
    ([(0, 0), (0, 0)], r"^head \(0, 0\) is given twice$"),
    ([(0,)], r"^a head must be a \(layer, head\) pair of non-negative ints, got \(0,\)$"),
])
def test_unknown_heads_are_refused_before_any_forward(pixart, heads, message):
    from attnlab.diffusion.guidance import softpag_predictor

    calls = []
    with pytest.raises(ConfigError, match=message):
        softpag_predictor(pixart[0], heads, forward=lambda *args: calls.append(args))
    assert calls == []


def test_alpha_out_of_range_is_refused(pixart):
    from attnlab.diffusion.guidance import softpag_predictor

    with pytest.raises(ConfigError, match=r"alpha must be in \[0.0, 1.0\]"):
        softpag_predictor(pixart[0], [], alpha=1.5, forward=pixart[1])


@pytest.mark.parametrize("kind, heads", [("dit", [(0, 0), (0, 1), (1, 0), (1, 1)]),
                                         ("sd3", [(0, 0), (0, 1), (1, 0), (1, 1)]),
                                         ("flux", [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]),
                                         ("wan", [(0, 0), (0, 1), (2, 0), (2, 1)])])
def test_other_architectures_identity_is_exact_and_alpha_one_acts(kind, heads):
    # dit: self only; sd3: joint; flux: 2 joint + 1 single-stream; wan: self + cross (cross refused)
    from attnlab.diffusion.guidance import perturbable_heads, softpag_predictor
    from attnlab.testing import tiny_diffusers

    model, inputs = tiny_diffusers(kind, seed=0)
    kwargs = inputs(batch=1)

    def forward(x, t, cond):
        with torch.no_grad():
            return model(**{**kwargs, "hidden_states": x, "timestep": t}, return_dict=False)[0]

    assert perturbable_heads(model) == heads
    x, t = kwargs["hidden_states"], kwargs["timestep"]
    reference = forward(x, t, None)
    identity = softpag_predictor(model, heads, alpha=0.0, scale=2.0, forward=forward)(x, t, None)
    assert torch.equal(identity, reference)
    acting = softpag_predictor(model, heads[-1:], alpha=1.0, scale=2.0, forward=forward)(x, t, None)
    assert (acting - reference).abs().max() > 1e-4


# the lab's image pipeline (a small random one) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab_pipe():
    from attnlab.lab.dit.model import DitSpec
    from attnlab.lab.dit.pipeline import LabPipeline

    return LabPipeline.build(DitSpec(layers=2, heads=2, head_dim=8, text_dim=8), seed=0).eval()


def test_lab_predictor_identity_settings_are_the_labs_own_cfg_sampler(lab_pipe):
    from attnlab.lab.dit.softpag import lab_predictor

    captions = ["a red circle", "a blue square"]
    reference = lab_pipe.sample(captions, steps=3, guidance=3.0, seed=0)
    for heads, alpha, scale in (([], 1.0, 2.0), ([(0, 1), (2, 0)], 0.0, 2.0), ([(0, 1)], 1.0, 0.0)):
        predict = lab_predictor(lab_pipe, heads, alpha=alpha, scale=scale)
        assert torch.equal(lab_pipe.sample(captions, steps=3, guidance=3.0, seed=0, predict=predict), reference)
    predict = lab_predictor(lab_pipe, [(0, 1)], alpha=1.0, scale=2.0)
    assert not torch.equal(lab_pipe.sample(captions, steps=3, guidance=3.0, seed=0, predict=predict), reference)


def test_lab_objective_refuses_bad_input(lab_pipe):
    from attnlab.diffusion.headhunter import headhunter
    from attnlab.lab.dit.softpag import lab_objective, lab_predictor

    with pytest.raises(ConfigError, match=r"^metric must be one of accuracy, .*; got 'fid'$"):
        lab_objective(lab_pipe, metric="fid")
    with pytest.raises(ConfigError, match=r"layer 1 is cross attention"):
        lab_predictor(lab_pipe, [(1, 0)])
    objective = lab_objective(lab_pipe, samples=2, steps=1)
    with pytest.raises(ConfigError, match=r"^head \(0, 2\): layer 0 has 2 heads"):
        headhunter(objective, [(0, 0), (0, 2)], rounds=1)
