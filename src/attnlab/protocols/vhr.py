"""``attnlab.calibrate_vhr``: VHR's calibrate-then-edit flow on a loaded vision-language model (METHODS.md #7).

    edit = attnlab.calibrate_vhr(loaded, batches, fraction=0.25, alpha=2.0)   # a `vhr` edit
    with attnlab.Session(loaded.model, edits=[edit]):
        loaded.model.generate(**batch)
    edit.spec()   # "vhr:alpha=2.0,pairs=0.1+1.3": replays the selection (--edit, eval variants, YAML)

The selection is :func:`attnlab.analyses.vhd.select_vhr` (layer by layer, earlier layers reinforced); this wrapper
only builds the runner that passes the image inputs to the model. CLI: ``attnlab vhr``.
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


__all__ = ["calibrate_vhr"]
