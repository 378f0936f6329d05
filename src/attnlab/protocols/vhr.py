"""``attnlab.calibrate_vhr``: VHR's calibrate-then-edit flow on a loaded vision-language model (METHODS.md #7; He et
al. 2025, arXiv 2412.13949, § not available (abstract only)).

    edit = attnlab.calibrate_vhr(loaded, batches, fraction=0.25, alpha=2.0)   # a `vhr` edit
    with attnlab.Session(loaded.model, edits=[edit]):
        loaded.model.generate(**batch)
    edit.spec()   # "vhr:alpha=2.0,pairs=0.1+1.3": replays the selection (--edit, eval variants, YAML)

The selection is :func:`attnlab.analyses.vhd.select_vhr` (layer by layer, earlier layers reinforced); this wrapper
only builds the runner that passes the image inputs to the model. CLI: ``attnlab vlm vhr``.
:func:`generation_t_vhd` gives the token-level T-VHD of a generated answer (one VHD per generation step).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from attnlab.analyses.vhd import Counterfactual, Measured, select_vhr
from attnlab.capture.vlm_runner import VisionRunner
from attnlab.edits.vhr import VHR
from attnlab.progress import progress_to


def calibrate_vhr(model: Any, batches: Iterable[dict[str, Tensor]], *, tokenizer: Any = None, fraction: float = 0.25,
                  alpha: float = 2.0, counterfactual: Counterfactual = "drop", at: Measured = "last",
                  layers: Sequence[int] | None = None, seed: int = 0, progress: Any = None) -> VHR:
    """The ``vhr`` edit chosen on calibration ``batches`` (model kwargs with the image inputs, on the model's device).

    Args:
        model: a LoadedModel or a transformers vision-language model. tokenizer: when ``model`` is not a LoadedModel.
        fraction, alpha, counterfactual, at, layers, seed: see :func:`attnlab.analyses.vhd.select_vhr`.
        progress: True for a progress bar, a callback ``(done, total, message)``, or None.
    Raises:
        ConfigError: see :func:`attnlab.analyses.vhd.select_vhr`.
    """
    facts = None
    if not isinstance(model, nn.Module):  # a LoadedModel
        model, tokenizer, facts = model.model, model.tokenizer, model.facts
    runner = VisionRunner(model, tokenizer, facts)
    with progress_to(progress) as report:
        return select_vhr(runner, batches, fraction=fraction, alpha=alpha, counterfactual=counterfactual, at=at,
                          layers=layers, seed=seed, progress=report)


def generation_t_vhd(model: Any, batch: dict[str, Tensor], *, tokenizer: Any = None, max_new_tokens: int = 20,
                     counterfactual: Counterfactual = "drop", seed: int = 0) -> list[list[tuple[str, float]]]:
    """T-VHD of every generated token: greedy generation, then VHD at each generation step (METHODS.md #7).

    The answer is generated greedily with the image; then prompt + answer are teacher-forced with and without the
    visual context (``counterfactual``), so the step that produced token y_t compares o(image, prompt, y_<t) with
    o(counterfactual, y_<t), the paper's definition. A low T-VHD marks a token produced from language priors.
    The teacher-forced answer tokens have role ``text``, not ``generated`` (see :mod:`attnlab.edits._vlm`): VHD
    itself reads no roles, but role-based edits passed in would act as on an instruction, not on generated tokens.

    Args:
        model: a LoadedModel or a transformers VLM (then ``tokenizer`` decodes the tokens, else ids are shown).
        batch: model kwargs of the prompts, left-padded (as batched generation needs).
    Returns:
        Per sequence, ``(token text, T-VHD)`` for each generated token up to and including the first EOS.
    Raises:
        ConfigError: a right-padded batch, max_new_tokens < 1, not a vision-language model.
    """
    import torch

    from attnlab.analyses.vhd import image_token_ids, model_inputs, t_vhd, vhd_of_batch
    from attnlab.errors import ConfigError

    facts = None
    if not isinstance(model, nn.Module):  # a LoadedModel
        model, tokenizer, facts = model.model, model.tokenizer, model.facts
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    inputs = model_inputs(batch)
    valid = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    if not bool(valid[:, -1].all()):
        raise ConfigError("generation_t_vhd needs a left-padded batch (every sequence ends in the last column)")
    runner = VisionRunner(model, tokenizer, facts)
    B, L = inputs["input_ids"].shape
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    generated = out[:, L:]  # (B, n)
    n = generated.shape[1]
    forced = {**inputs, "input_ids": torch.cat([inputs["input_ids"], generated[:, :-1]], 1),
              "attention_mask": torch.cat([valid.long(), torch.ones(B, n - 1, dtype=torch.long,
                                                                    device=valid.device)], 1)}
    answer = torch.zeros(B, L + n - 1, dtype=torch.bool, device=valid.device)
    answer[:, L - 1:] = True  # the output at column L-1+j predicts generated token j
    distance, _, _ = vhd_of_batch(runner, {**forced, "answer_mask": answer}, ids=image_token_ids(runner.facts, model),
                                  counterfactual=counterfactual, at="answer", seed=seed)
    scores = t_vhd(distance).view(B, n)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = set(eos if isinstance(eos, list) else [eos]) - {None}
    result = []
    for b in range(B):
        row = []
        for j in range(n):
            token = int(generated[b, j])
            row.append((tokenizer.decode([token]) if tokenizer is not None else str(token), float(scores[b, j])))
            if token in stops:
                break
        result.append(row)
    return result


__all__ = ["calibrate_vhr", "generation_t_vhd"]
