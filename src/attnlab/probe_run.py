"""``attnlab probe`` as a function: any registered probes (attention-level and model-level) → a results dict.

    from attnlab.pipeline import RunConfig
    from attnlab.probe_run import run_probe_suite
    results = run_probe_suite(RunConfig(seq_len=128, max_windows=2, probes=("massive_activations", "inflection")))

Attention-level probes run inside one :class:`attnlab.Session` over the windows (as ``attnlab report`` does);
model-level probes (:class:`attnlab.probes.model_base.ModelProbe`) then get every batch through a
:class:`attnlab.capture.model_probes.ModelRunner`. ``compare`` loads a second model for probes that compare two
models (``cka``); it must use the same tokenizer. The results dict has the layout of docs/results.md with
``command = "probe"``, ``probe_args`` and, with ``compare``, ``compare_model``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from attnlab.errors import ConfigError
from attnlab.params import build_probes, parse_probe_args
from attnlab.pipeline import Progress, RunConfig, load_for_run, results_envelope
from attnlab.probes.model_base import is_model_probe

__all__ = ["build_probes", "parse_probe_args", "run_probe_suite"]  # the two parsers live in attnlab.params


def run_probe_suite(config: RunConfig, *, probe_args: Mapping[str, Mapping[str, Any]] | None = None,
                    compare: str | None = None, progress: Progress | None = None, model: Any = None,
                    tokenizer: Any = None) -> dict[str, Any]:
    """Load model and text, run every probe of ``config.probes``, and return the results dict.

    Raises:
        ConfigError, TextError, RegistryError, UnsupportedModelError: bad input (the CLI exits 2).
        AssetError: a bundled asset cannot be fetched or verified.
    """
    import torch

    from attnlab.capture.loading import load_model, model_info
    from attnlab.capture.model_probes import ModelRunner
    from attnlab.capture.session import Session
    from attnlab.text import load_text

    started = time.perf_counter()
    notify = progress or (lambda done, total, message: None)
    probe_args = {k: dict(v) for k, v in (probe_args or {}).items()}
    probes = build_probes(config.probes, probe_args)
    model, tokenizer = load_for_run(config, notify, model, tokenizer)
    runner = ModelRunner(model, tokenizer)
    other_info = None
    if compare is not None:
        notify(0, 0, f"loading model {compare}")
        other_model, other_tokenizer = load_model(compare, dtype=config.dtype, device=config.device)
        if other_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"--compare {compare} uses a different tokenizer than {config.model}; CKA needs the "
                              "same tokens")
        runner.other = ModelRunner(other_model, other_tokenizer)
        other_info = {**model_info(other_model), "requested": compare}
    if compare is None and any(getattr(p, "needs_compare", False) for p in probes):
        names = [p.name for p in probes if getattr(p, "needs_compare", False)]
        raise ConfigError(f"probe(s) {', '.join(names)} compare two models; pass --compare OTHER_MODEL")
    for probe in probes:
        if hasattr(probe, "prepare"):
            probe.prepare(runner.info)
    notify(0, 0, "reading text")
    windows = load_text(tokenizer, config.text, seq_len=config.seq_len, max_windows=config.max_windows,
                        bos=config.bos, batch_size=config.batch_size, device=config.device)
    runner.bos_policy = "always" if windows.bos_added else "never"  # text-B windows follow the run's windows
    attention_probes = [p for p in probes if not is_model_probe(p)]
    model_probes = [p for p in probes if is_model_probe(p)]
    total = len(windows) * (bool(attention_probes) + bool(model_probes))
    done = 0
    paths: dict[int, str] = {}
    if attention_probes:
        session = Session(model, probes=attention_probes, block_size=config.block_size,
                          query_fraction=config.query_fraction)
        with session, torch.no_grad():
            for batch in windows:
                notify(done, total, "running attention probes")
                model(**batch)
                done += 1
        paths = session.paths
    for batch in windows if model_probes else []:
        notify(done, total, "running model probes")
        for probe in model_probes:
            probe.observe(runner, batch)
        done += 1
    for probe in model_probes:
        probe.finish(runner)
    notify(total, total, "done")

    def decode(token_id: int) -> str:
        return tokenizer.decode([token_id])

    results = results_envelope(
        "probe", config, model, tokenizer, bos_policy=windows.bos_policy, bos_added=windows.bos_added,
        attention_paths=paths, windows=windows.windows, rows=[row for probe in probes for row in probe.rows()],
        started=started, probe_args=probe_args, extras={probe.name: probe.extras(decode) for probe in probes},
    )
    if other_info is not None:
        results["compare_model"] = other_info
    return results
