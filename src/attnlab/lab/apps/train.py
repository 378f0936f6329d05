"""Train an application variant, or every variant on the same data, with probes at each evaluation.

    from attnlab.lab.apps.train import AppTrainConfig, compare_variants, train_app
    result = train_app(AppTrainConfig(app="hpnet", variant="hpa", steps=50))
    result.final                       # {"loss": ..., "ade": ..., ...} at the last evaluation
    table = compare_variants(AppTrainConfig(app="hpnet")).table   # one row per variant (pandas-ready)

One run: the model is ``app.build_model(seed)``; update ``s`` (1-based) trains on ``data.batch(s - 1, batch_size)``
(the generator gets ``seed`` unless ``data_args`` sets its own), so every variant of a comparison sees the same
batches. AdamW (or SGD) with linear warmup and cosine decay, weight decay on matrices only and gradient clipping,
as ``attnlab train`` (:func:`attnlab.lab.train.learning_rate`, :func:`~attnlab.lab.train.make_optimizer`).
Evaluation at step 0, every ``eval_every`` steps and at the last step: the app's metrics averaged over
``eval_batches`` eval batches (``Σ sum / Σ count``) and the probes in an :class:`attnlab.Session` over eval batch 0
(eval mode, no grad; :func:`attnlab.lab.train_results.probe_pass`); probe rows carry ``step`` and ``variant``.
Training settings left as None come from the app's ``defaults`` (its documented findings run), then from
:data:`FALLBACK`. There is no resume: these runs take minutes.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from attnlab.errors import ConfigError, TrainingDivergedError
from attnlab.params import Range, coerce
from attnlab.progress import ProgressArg, progress_to

__all__ = ["FALLBACK", "AppTrainConfig", "AppTrainResult", "CompareResult", "compare_variants", "train_app"]

FALLBACK: dict[str, Any] = {"steps": 300, "lr": 3e-3, "batch_size": 32, "eval_every": 100, "eval_batches": 4,
                            "weight_decay": 0.01, "warmup_steps": 0, "min_lr_ratio": 0.1, "optimizer": "adamw"}
"""Training settings for an app whose ``defaults`` do not give them (a setting left as None takes the app's
default, then this one)."""


@dataclass(frozen=True)
class AppTrainConfig:
    """One application run (JSON-ready with :meth:`to_dict`).

    Attributes:
        app, variant: ``attnlab ls apps`` and one of its variants (None: the first, the paper's mechanism, for
            :func:`train_app`; :func:`compare_variants` ignores it).
        model_args, data_args: the app's model knobs and its generator's arguments (text or typed values); an
            argument the app shares between them (``App.shared_args``) given on one side is set on both.
        hidden_size, num_heads: every attention site's width and heads.
        steps, lr, batch_size, eval_every, eval_batches, weight_decay, warmup_steps, min_lr_ratio, optimizer:
            as ``attnlab train``; None = the app's ``defaults``, then :data:`FALLBACK`.
        grad_clip: max global gradient norm (None = no clipping).
        probes, probe_args: probes run at each evaluation (``attnlab ls probes``) and their arguments.
        seed: model initialisation and (unless ``data_args`` has ``seed``) the data.
        out: directory for ``checkpoint/`` and ``train_log.csv`` (None: write nothing).

    Raises ConfigError (one line) for a value out of range or a shared argument given differently on the two
    sides, RegistryError for an unknown app or probe.
    """

    app: str
    variant: str | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)
    data_args: Mapping[str, Any] = field(default_factory=dict)
    hidden_size: Annotated[int, Range(ge=1, le=65536)] = 32
    num_heads: Annotated[int, Range(ge=1, le=1024)] = 4
    steps: Annotated[int, Range(ge=1)] | None = None
    lr: Annotated[float, Range(gt=0, le=10)] | None = None
    batch_size: Annotated[int, Range(ge=1, le=65536)] | None = None
    eval_every: Annotated[int, Range(ge=1)] | None = None
    eval_batches: Annotated[int, Range(ge=1, le=65536)] | None = None
    weight_decay: Annotated[float, Range(ge=0, le=10)] | None = None
    warmup_steps: Annotated[int, Range(ge=0)] | None = None
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] | None = None
    optimizer: Literal["adamw", "sgd"] | None = None
    grad_clip: Annotated[float, Range(gt=0)] | None = 1.0
    probes: tuple[str, ...] = ("sink", "entropy", "distance")
    probe_args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    seed: Annotated[int, Range(ge=0)] = 0
    out: str | None = None

    def __post_init__(self) -> None:
        from attnlab.lab.apps import APPS
        from attnlab.params import build_probes

        app = APPS.get(self.app)  # RegistryError with a suggestion
        unknown = sorted(set(app.defaults) - set(FALLBACK))
        if unknown:  # a bug in the app, not in the caller's input
            raise ConfigError(f"app {self.app}: defaults may set {', '.join(FALLBACK)}, not {', '.join(unknown)}")
        hints = typing.get_type_hints(AppTrainConfig, include_extras=True)
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name in ("model_args", "data_args", "probe_args"):
                if not isinstance(value, Mapping):
                    raise ConfigError(f"app: {item.name} must map names to values, got {value!r}")
                value = {key: dict(v) if isinstance(v, Mapping) else v for key, v in value.items()}
            elif item.name == "app":
                continue
            elif item.name == "out":
                value = None if value is None else str(value)
            elif item.name in FALLBACK and value is None:
                value = coerce(app.defaults.get(item.name, FALLBACK[item.name]), hints[item.name],
                               owner=f"app {self.app} defaults", param=item.name)
            else:
                value = coerce(value, hints[item.name], owner="app", param=item.name)
            object.__setattr__(self, item.name, value)
        model_args, data_args = app.share_args(self.model_args, self.data_args)  # a shared value sets both sides
        object.__setattr__(self, "model_args", model_args)
        object.__setattr__(self, "data_args", data_args)
        if self.warmup_steps > self.steps:
            raise ConfigError(f"app: warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        self.make_app().data(**{"seed": self.seed, **self.data_args})  # ConfigError for a bad variant, model or
        # data argument, or size: now, not after the first variant has trained
        build_probes(self.probes, self.probe_args)  # RegistryError / ConfigError now, not after training

    def make_app(self) -> Any:
        """The application instance of this run's variant."""
        from attnlab.lab.apps import APPS

        return APPS.get(self.app)(self.variant, hidden_size=self.hidden_size, num_heads=self.num_heads,
                                  **self.model_args)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples as lists, mappings as dicts."""
        return {key: list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, Mapping)
                else value for key, value in dataclasses.asdict(self).items()}


@dataclass
class AppTrainResult:
    """What :func:`train_app` returns: config; final (the last evaluation's metrics, ``loss`` included); log
    (``step, split, statistic, value`` rows); probe_rows (with ``step`` and ``variant``); attention_paths of the
    last probe pass; num_parameters; seconds; results (the results dict, docs/results.md); model; checkpoint."""

    config: AppTrainConfig
    final: dict[str, float]
    log: list[dict[str, Any]]
    probe_rows: list[dict[str, Any]]
    attention_paths: dict[int, str]
    num_parameters: int
    seconds: float
    results: dict[str, Any]
    model: Any = None
    checkpoint: Path | None = None


def evaluate(app: Any, model: Any, data: Any, config: AppTrainConfig) -> dict[str, float]:
    """The app's metrics and ``loss`` over ``eval_batches`` eval batches (eval mode, no grad)."""
    import torch

    sums: dict[str, list[float]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index in range(config.eval_batches):
                batch = data.batch(index, config.batch_size, split="eval")
                metrics = {"loss": (float(app.loss(model, batch)), 1.0), **app.metrics(model, batch)}
                for key, (total, count) in metrics.items():
                    slot = sums.setdefault(key, [0.0, 0.0])
                    slot[0], slot[1] = slot[0] + float(total), slot[1] + float(count)
    finally:
        model.train(was_training)
    return {key: total / count if count else math.nan for key, (total, count) in sums.items()}


def train_app(config: AppTrainConfig, *, progress: ProgressArg = None) -> AppTrainResult:
    """Train the run ``config`` describes (module docstring). ``progress``: None (silent), True (stderr: a bar in
    a terminal, plain lines otherwise) or ``progress(done, total, message)``; evaluations get lines of their own.

    Raises ConfigError/RegistryError on bad settings (before any training), TrainingDivergedError when the loss
    becomes NaN or infinite."""
    config = dataclasses.replace(config, variant=config.make_app().variant)  # None → the first, named in results
    with progress_to(progress, always=lambda message: message.startswith("eval")) as notify:
        return _train(config, notify)


def _train(config: AppTrainConfig, notify: Any) -> AppTrainResult:
    import torch

    from attnlab.lab.apps.results import app_results
    from attnlab.lab.train import learning_rate, make_optimizer
    from attnlab.lab.train_results import probe_pass, write_log

    app = config.make_app()
    data = app.data(**{"seed": config.seed, **config.data_args})
    model = app.build_model(seed=config.seed)
    optimizer = make_optimizer(config, model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    num_parameters = sum(p.numel() for p in model.parameters())
    log: list[dict[str, Any]] = []
    probe_rows: list[dict[str, Any]] = []
    paths: dict[int, str] = {}
    final: dict[str, float] = {}
    began = time.perf_counter()

    def run_eval(step: int) -> None:
        final.clear()
        final.update(evaluate(app, model, data, config))
        log.extend({"step": step, "split": "eval", "statistic": key, "value": value} for key, value in final.items())
        batch = data.batch(0, config.batch_size, split="eval")
        rows, seen = probe_pass(model, config, step=step, forward=lambda m: app.loss(m, batch), variant=app.variant)
        probe_rows.extend(rows)
        paths.clear()
        paths.update(seen)
        shown = ", ".join(f"{key} {value:.4g}" for key, value in final.items())
        notify(step, config.steps, f"eval step {step}/{config.steps} ({app.variant}): {shown}")

    run_eval(0)
    model.train()
    for step in range(1, config.steps + 1):
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = app.loss(model, data.batch(step - 1, config.batch_size))
        if not torch.isfinite(loss.detach()):
            raise TrainingDivergedError(f"app {app.name} ({app.variant}): the loss became {float(loss.detach())} "
                                        f"at step {step}; lower --lr")
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        log.extend({"step": step, "split": "train", "statistic": key, "value": value}
                   for key, value in (("loss", loss_value), ("lr", lr), ("grad_norm", float(norm))))
        notify(step, config.steps, f"step {step}/{config.steps} ({app.variant}): loss {loss_value:.4g}")
        if step % config.eval_every == 0 or step == config.steps:
            run_eval(step)
    seconds = time.perf_counter() - began
    model.eval()
    model.config.data_args = {key: value for key, value in data.describe().items() if key != "name"}
    checkpoint = None
    if config.out is not None:
        from attnlab.capture.loading import no_hf_progress_bars
        from attnlab.lab.checkpoint import replace_dir

        def fill(folder: Path) -> None:
            with no_hf_progress_bars():
                model.save_pretrained(folder, safe_serialization=True)

        out = Path(config.out)
        checkpoint = replace_dir(out, "checkpoint", fill)
        write_log(out / "train_log.csv", log)
    results = app_results(config, app, model, data, log=log, probe_rows=probe_rows, paths=paths,
                          num_parameters=num_parameters, seconds=seconds, final=final)
    return AppTrainResult(config, dict(final), log, probe_rows, dict(paths), num_parameters, seconds, results,
                          model, checkpoint)


@dataclass
class CompareResult:
    """What :func:`compare_variants` returns: ``runs`` (variant → AppTrainResult), ``table`` (one dict per variant:
    variant, the final metrics, each probe's summary statistic (:data:`SUMMARY`) at the last evaluation, seconds,
    parameters) and ``results`` (the combined results dict: every run's rows, each tagged with its variant)."""

    runs: dict[str, AppTrainResult]
    table: list[dict[str, Any]]
    results: dict[str, Any]


def compare_variants(config: AppTrainConfig, variants: tuple[str, ...] | None = None, *,
                     progress: ProgressArg = None) -> CompareResult:
    """Train each variant (default: all of the app's) with ``config``'s settings, seed and data; each run writes
    to ``out/VARIANT`` when ``config.out`` is set. Raises ConfigError for an unknown variant (before training)."""
    from attnlab.lab.apps.results import compare_results, summary_row

    app_cls = config.make_app().__class__
    chosen = tuple(app_cls.variants) if not variants else tuple(variants)
    unknown = [v for v in chosen if v not in app_cls.variants]
    if unknown:
        raise ConfigError(f"app {config.app}: expected variants among {', '.join(app_cls.variants)}, got "
                          f"{', '.join(unknown)}")
    runs: dict[str, AppTrainResult] = {}
    total = config.steps * len(chosen)
    with progress_to(progress, always=lambda message: message.startswith("eval")) as notify:
        for index, variant in enumerate(chosen):
            out = None if config.out is None else str(Path(config.out) / variant)
            offset = index * config.steps  # one count over every variant, so the ETA covers the whole comparison

            def counted(done: int, _total: int, message: str, offset: int = offset) -> None:
                notify(offset + done, total, message)

            runs[variant] = _train(dataclasses.replace(config, variant=variant, out=out), counted)
    table = [summary_row(run) for run in runs.values()]
    return CompareResult(runs, table, compare_results(config, runs, table))
