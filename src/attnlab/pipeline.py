"""The one run path: model + text → probes and analyses → a results dict (docs/results.md), ready to write.

    from attnlab.config import RunConfig
    from attnlab.pipeline import run_probes
    results = run_probes(RunConfig(seq_len=256, max_windows=2, probes=("entropy", "inflection")))

``attnlab report`` (default probes) and ``attnlab probe`` both call :func:`run_probes`; ``attnlab eval``
(:func:`attnlab.evaluation.runner.run_eval`) shares its start (:func:`start_run`: seed, text check, model load,
seq_len check) and its envelope (:func:`results_envelope`).

A name in ``config.run.probes`` is dispatched by :func:`attnlab.config.probe_kind`:

- an attention probe (:data:`attnlab.probes.PROBES`) observes attention calls inside one :class:`attnlab.Session`
  over the windows;
- an analysis (:data:`attnlab.analyses.ANALYSES`) is prepared with ``prepare(facts, runner)`` and then sees every
  batch through a :class:`attnlab.capture.runner.ModelRunner` (``observe``), then ``finish``.

Attention probes are prepared too (:meth:`attnlab.probes.base.Probe.prepare`), with the runner only when they
declare ``needs_runner`` (magnets: token strings, the BOS id) and with None otherwise; model settings such as
rope_theta reach them in ``bind``. The runner is built only for an analysis or a probe with ``needs_runner``, so a
report of the default attention probes never builds one.

Image inputs (``config.inputs``: ``--image``/``--prompt`` or ``--manifest``, :mod:`attnlab.capture.vlm_inputs`)
replace the text windows on a vision-language model: each item is one sequence (every item: ``max_windows``
counts text windows only), batched by ``batch_size``, each batch run under its token roles (:func:`attnlab.roles.given_roles`), and
``results["inputs"]`` records every item's prompt, answer, system prompt, images (path, sha256, width, height,
fed) and the file and tile of each image span; the viewer's pattern pass is skipped.

Unless ``config.run.pattern_heads`` is ``"none"``, one extra forward pass on the first window's first
``pattern_tokens`` tokens gives ``results["patterns"]``, the report viewer's data (docs/patterns.md).

Shards and processes (:mod:`attnlab.shards`, :mod:`attnlab.distributed`). The run is a loop over *shards*, one
batch of windows each (shard ``i`` = windows ``i·batch_size …``). Per shard the probes and analyses start from
their empty state, see the batch (the attention probes in the Session, then each analysis's ``observe``), and
their exported states form the shard's bundle, merged into this process's running total in window order (and
saved to ``OUT/.shards`` when a :class:`attnlab.shards.ShardStore` is given; with ``--resume`` saved shards are
read instead of computed). Under ``torchrun`` with N processes every rank tokenizes the whole text (so rank 0
knows every window for results.json), takes a contiguous range of the shards
(:func:`attnlab.distributed.shard_range`), and joins one progress sum per step (ranks with fewer shards too, so
uneven shards never deadlock); at the end the ranks' totals are gathered to rank 0 alone (safetensors
payloads, never pickle; :func:`attnlab.shards.gather_bundles`), which merges them in rank order, runs every
analysis's ``finish`` on the merged state, makes the viewer's pattern pass and returns the results; the other
ranks return None.

Equality: N processes give the results of one process over the same windows. Each shard is the same batch
whatever the number of processes, so every shard's state is the same; merging shards in another grouping only
changes the order of float64 additions. Counts (rows seen, hits, windows) are equal exactly; every row of
results.json is equal within ``rtol=1e-9, atol=1e-12`` (tests/test_distributed_probe.py; measured ≤ 3e-16 relative
on a tiny Llama); hit lists, per-window records and extras are the same, with the same global window indices.
(On GPUs, kernels that are not deterministic can add their own run-to-run differences.)

Every built-in probe and analysis is ``shardable`` (:class:`attnlab.probes.base.Measurement`; False by default);
a plug-in that is not is refused under several processes and with ``--resume`` (ConfigError naming it), and in
one process the run makes one plain pass (:func:`_single_pass`: one Session over every window, then each
analysis's ``observe`` per batch; no reset, export, merge or shard files). Errors: the set-up (model, text,
prepare, shard check) runs under :func:`attnlab.distributed.agree` and each step's work is caught and passed to
the step's one collective (:func:`attnlab.distributed.sync_step`), so a failure on one rank stops every rank with
one agreed line instead of leaving the others waiting. ``finish`` (and text B of active_dormant/head_overlap)
runs on rank 0 alone, on the merged state.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import platform
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from attnlab import __version__
from attnlab.columns import SCHEMA_VERSION
from attnlab.config import ModelSpec, RunConfig, TextSpec, probe_kind
from attnlab.errors import ConfigError
from attnlab.progress import Progress, ProgressArg, progress_to
from attnlab.report.sections import section_specs
from attnlab.shards import Accumulator, Bundle, ShardStore, bundle_of, gather_bundles, load_bundle

logger = logging.getLogger(__name__)

__all__ = ["RunConfig", "results_envelope", "run_probes", "start_run"]


def versions() -> dict[str, str]:
    """Versions of python, torch, transformers and attnlab (results.json's ``versions``)."""
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "attnlab": __version__}


def check_seq_len(facts: Any, seq_len: int, option: str = "--seq-len") -> None:
    """ConfigError if ``seq_len`` exceeds the model's maximum number of positions (``facts.max_positions``)."""
    if facts.max_positions is not None and seq_len > facts.max_positions:
        raise ConfigError(f"{option} {seq_len} exceeds the model's max_position_embeddings={facts.max_positions}")


def start_run(load: ModelSpec, data: TextSpec, seed: int, notify: Progress, model: Any = None,
              tokenizer: Any = None, *, check_len: bool = True) -> Any:
    """The start every command shares: seed, check the text file, load the model (unless given), check seq_len.

    Returns a :class:`attnlab.capture.loading.LoadedModel`; a ``model``/``tokenizer`` pair passed in (or a
    LoadedModel as ``model``) is used as is (``load.model`` is then only recorded as requested). ``check_len``
    False skips the seq_len check (a run that feeds no windows of seq_len). Raises TextError/ConfigError before
    the model loads where it can.
    """
    import torch

    from attnlab.capture.loading import LoadedModel, load_model
    from attnlab.text import read_text_file

    random.seed(seed)
    torch.manual_seed(seed)
    if data.text is not None:
        read_text_file(data.text)  # fail on a missing/empty/non-UTF-8 file before loading the model
    if isinstance(model, LoadedModel):
        loaded = model
    elif model is not None and tokenizer is not None:
        loaded = LoadedModel.wrap(model, tokenizer)
    else:
        notify(0, 0, f"loading model {load.model}")
        loaded = load_model(load.model, dtype=load.dtype, device=load.device, tokenizer=load.tokenizer,
                            device_map=load.device_map)
    if check_len:
        check_seq_len(loaded.facts, data.seq_len)
    return loaded


def results_envelope(command: str, config: Any, loaded: Any, *, bos_policy: str, bos_added: bool,
                     attention_paths: dict[Any, str], windows: list[dict[str, Any]], rows: list[dict[str, Any]],
                     started: float, **sections: Any) -> dict[str, Any]:
    """The results dict every command writes (docs/results.md): provenance, config, tokens fed, rows, timing;
    ``sections`` adds command-specific keys (``extras``, ``eval``, ``probe_args`` ...).

    ``model`` is ``loaded.facts.to_dict()`` plus ``loaded_from`` and ``requested``; ``tokenizer`` is
    ``loaded.tokenizer_facts`` plus the run's BOS policy.
    """
    from attnlab.distributed import world

    tokenizer = loaded.tokenizer
    seed = config.to_dict()["seed"]
    return {
        "schema_version": SCHEMA_VERSION,
        "attnlab_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": config.to_dict(),
        "model": loaded.model_record(config.load.model),
        "tokenizer": {**loaded.tokenizer_facts, "class": type(tokenizer).__name__, "bos_policy": bos_policy,
                      "bos_token": getattr(tokenizer, "bos_token", None), "bos_added": bos_added},
        "seed": seed,
        "versions": versions(),
        "attention_paths": {str(layer): path for layer, path in sorted(attention_paths.items())},
        "windows": windows,
        "rows": rows,
        **sections,
        "timing": {"seconds": round(time.perf_counter() - started, 3), "processes": world().size},
    }


def build_observers(config: RunConfig) -> list[tuple[str, Any]]:
    """``(kind, object)`` for every name of ``config.run.probes``, built with its ``probe_args``.

    Both kinds are built by :func:`attnlab.params.build_probes`. Raises ConfigError (``bad --probe-arg for NAME:
    ...``) on arguments a probe or analysis does not take, RegistryError on an unknown name.
    """
    from attnlab.params import build_probes

    names = config.run.probes
    built = build_probes(names, config.run.probe_args)
    return [(probe_kind(name), obj) for name, obj in zip(names, built)]


class _LazyRunner:
    """Builds the ModelRunner (and the --compare model's) on first use only.

    The compare model is loaded with its own tokenizer, or with ``--tokenizer`` when its folder has none; its
    vocabulary must equal the run's (ConfigError otherwise)."""

    def __init__(self, loaded: Any, compare: str | None, load: ModelSpec, notify: Progress) -> None:
        self.loaded, self.compare, self.load, self.notify = loaded, compare, load, notify
        self.runner: Any = None
        self.compare_record: dict[str, Any] | None = None

    def get(self) -> Any:
        if self.runner is None:
            from attnlab.capture.runner import ModelRunner

            self.runner = ModelRunner(self.loaded.model, self.loaded.tokenizer, facts=self.loaded.facts)
            if self.compare is not None:
                self.runner.other = self._other()
        return self.runner

    def _other(self) -> Any:
        from attnlab.capture.loading import lacks_tokenizer, load_model
        from attnlab.capture.runner import ModelRunner

        self.notify(0, 0, f"loading model {self.compare}")
        # --tokenizer is the run's model's; the compare model keeps its own (checked below) unless it has none
        tokenizer = self.load.tokenizer if lacks_tokenizer(self.compare) else None
        other = load_model(self.compare, dtype=self.load.dtype, device=self.load.device, tokenizer=tokenizer)
        if other.tokenizer.get_vocab() != self.loaded.tokenizer.get_vocab():
            raise ConfigError(f"--compare {self.compare} uses a different tokenizer than {self.load.model}; CKA "
                              "needs the same tokens")
        self.compare_record = other.model_record(self.compare)
        return ModelRunner(other.model, other.tokenizer)


class _Tally:
    """Overall progress of a run, in passes: one per window of the attention probes; per analysis and batch the
    inner steps it plans (:meth:`attnlab.analyses.base.Analysis.planned_steps`, e.g. one pass per head; one for an
    object without that method) and in its ``finish`` as many as it plans there; one for the viewer's pattern pass.
    The total is known from the start, so the percentage only grows; an analysis that reports a different count
    (:meth:`attnlab.analyses.base.Analysis.report_progress`) corrects it. ``done`` never decreases."""

    def __init__(self, notify: Progress, batches: int, attention: bool, analyses: list[Any], *,
                 windows: int | None = None, extra: int = 0) -> None:
        self.notify, self.batches, self.done, self.extra = notify, batches, 0, extra
        self.offset = 0  # the other ranks' passes, as of the last sync
        self.message = ""
        self.attention = batches if attention else 0
        self.size: dict[int, int] = {}  # passes per observe call
        self.finish_size: dict[int, int] = {}  # passes in finish
        for obj in analyses:
            planned = getattr(obj, "planned_steps", None)
            per_call, in_finish = planned(batches, batches if windows is None else windows) if planned else (1, 0)
            self.size[id(obj)], self.finish_size[id(obj)] = per_call, in_finish

    @property
    def total(self) -> int:
        planned = self.attention + sum(size * self.batches for size in self.size.values())
        return max(self.done + self.offset, planned + sum(self.finish_size.values()) + self.extra)

    def show(self, message: str) -> None:
        """Report the global count (this rank's passes plus the others' as of the last :meth:`sync`)."""
        self.message = message
        self.notify(self.done + self.offset, self.total, message)

    def step(self, message: str, advance: int = 0) -> None:
        self.done += advance
        self.show(message)

    def per_shard(self) -> int:
        """The passes one shard makes (counted at once for a shard read from a file)."""
        return int(self.attention > 0) + sum(self.size.values())

    def sync(self, error: Exception | None = None) -> None:
        """Every rank calls this once per step (:func:`attnlab.distributed.sync_step`, one collective): the global
        count is the sum of every rank's ``done``; ``error`` (this rank's step failed) stops every rank with one
        agreed line. In one process ``error`` is raised as is."""
        from attnlab.distributed import sync_step, world

        if not world().active:
            if error is not None:
                raise error
            return
        self.offset = int(sync_step(float(self.done), error, what="the progress count")) - self.done
        self.show(self.message)

    @contextmanager
    def call(self, obj: Any, label: str, *, finish: bool = False) -> Iterator[None]:
        """Report around one ``observe``/``finish`` call of ``obj``, passing its inner steps on."""
        sizes, key, base = self.finish_size if finish else self.size, id(obj), self.done

        def inner(done: int, total: int, what: str) -> None:
            if total > 0:
                sizes[key] = total
            self.done = max(self.done, base + min(max(done, 0), sizes[key]))
            self.show(f"{label} · {what} {done}/{total}")

        set_progress = getattr(obj, "set_progress", lambda hook: None)
        set_progress(inner)
        self.show(label)
        try:
            yield
        finally:
            set_progress(None)
        self.done = max(self.done, base + sizes[key])


def run_probes(config: RunConfig, *, progress: ProgressArg = None, model: Any = None, tokenizer: Any = None,
               command: str = "probe", shards: ShardStore | None = None) -> dict[str, Any] | None:
    """Load model and text, run every probe and analysis of ``config.run.probes``; return the results dict.

    Pass ``model``/``tokenizer`` (or a LoadedModel as ``model``) to reuse a loaded model (``config.load.model`` is
    then only recorded). ``command`` is recorded in the results (``"report"`` or ``"probe"``). With
    ``config.run.compare`` a second model is loaded for analyses that compare two models. ``shards`` saves each
    shard's state under ``--out`` and, when made with ``resume=True``, reuses the saved ones (module docstring); the
    files stay until the caller, having written the results, calls ``shards.remove()`` on every rank.

    Under several processes (``torchrun``; the caller runs this inside :func:`attnlab.distributed.distributed`)
    every rank must call it with the same config; rank 0 returns the results of all windows, the others None.

    Raises:
        ConfigError, TextError, RegistryError, UnsupportedModelError: bad input (the CLI exits 2); also a probe or
            analysis that is not ``shardable`` under several processes or with ``--resume``, and a saved shard
            of another run.
        AssetError: a bundled asset cannot be fetched or verified.
        DistributedError: another rank died (the message names this rank); nothing is returned.

    ``progress``: None (silent), True (stderr: a bar with ETA in a terminal, else plain lines) or a callable
    ``(done, total, message)`` (:mod:`attnlab.progress`). Counts are passes, all planned before the first: windows
    of the attention probes, then per analysis and batch one pass or its inner steps (``active_dormant: window 1/2 ·
    head 37/270``), then the viewer's pattern pass.
    """
    with progress_to(progress) as notify:  # the CLI passes progress on rank 0 only (cli.options.with_progress)
        return _run_probes(config, notify, model, tokenizer, command, shards)


def _check_shardable(observers: list[tuple[str, Any]], shards: ShardStore | None) -> bool:
    """True when every probe and analysis is ``shardable``; False (one plain pass) for a plug-in that is not in
    one process. Raises ConfigError naming them under several processes or with ``--resume``."""
    from attnlab.distributed import world

    unshardable = [obj.name for _, obj in observers if not getattr(obj, "shardable", False)]
    if not unshardable:
        return True
    names = ", ".join(unshardable)
    if world().active:
        raise ConfigError(f"{names} cannot run over several processes (its state does not merge across ranks); "
                          "run it in one process")
    if shards is not None and shards.resume:
        raise ConfigError(f"--resume: {names} saves no shard state; run without --resume")
    return False


@dataclasses.dataclass
class _Run:
    """What the set-up phase (:func:`_set_up`) gives the loop."""

    observers: list[tuple[str, Any]]
    loaded: Any
    runner: _LazyRunner
    windows: Any
    session: Any
    tally: _Tally
    shards: ShardStore | None
    sharded: bool

    @property
    def objects(self) -> list[Any]:
        return [obj for _, obj in self.observers]

    @property
    def driving(self) -> list[Any]:
        return [obj for kind, obj in self.observers if kind != "attention"]


def _set_up(config: RunConfig, notify: Progress, model: Any, tokenizer: Any, shards: ShardStore | None) -> _Run:
    """Build the probes, load model and text, prepare everything and open the shard store (no collective inside:
    :func:`_run_probes` agrees on its errors across ranks)."""
    from attnlab.capture.device_map import input_device
    from attnlab.capture.pattern_report import check_pattern_heads
    from attnlab.capture.session import Session
    from attnlab.distributed import rank_device
    from attnlab.text import load_text

    observers = build_observers(config)
    sharded = _check_shardable(observers, shards)
    needs_compare = [obj.name for _, obj in observers if getattr(obj, "needs_compare", False)]
    if config.run.compare is None and needs_compare:
        raise ConfigError(f"probe(s) {', '.join(needs_compare)} compare two models; pass --compare OTHER_MODEL")
    load = dataclasses.replace(config.load, device=rank_device(config.load.device))  # cuda -> cuda:LOCAL_RANK
    images = config.inputs.items() if config.inputs.active else None  # a bad manifest/image fails before loading
    if model is None:  # --image on a text model: from its config, before the weights load
        from attnlab.capture.vlm_loading import check_model_kind

        check_model_kind(config.load.model, images=images is not None)
    loaded = start_run(load, config.data, config.run.seed, notify, model, tokenizer, check_len=images is None)
    check_pattern_heads(loaded.facts, config.run.pattern_heads)  # an explicit head outside the model: fail now
    runner = _LazyRunner(loaded, config.run.compare, load, notify)
    if config.run.compare is not None:
        runner.get()  # load and check the second model before the run
    for kind, obj in observers:
        prepare = getattr(obj, "prepare", None)
        if prepare is not None:  # analyses and magnets get the runner; other probes None (settings come in bind)
            prepare(loaded.facts, runner.get() if kind == "analysis" or getattr(obj, "needs_runner", False) else None)
    if images is not None:
        windows = _image_batches(config, loaded, images, notify)
    else:
        notify(0, 0, "reading text")
        windows = load_text(loaded.tokenizer, config.data.text, seq_len=config.data.seq_len,
                            max_windows=config.data.max_windows, bos=config.data.bos,
                            batch_size=config.data.batch_size, device=input_device(loaded.model))
    if runner.runner is not None:  # text B windows of analyses follow the run's windows
        runner.runner.bos_policy = "always" if windows.bos_added else "never"
    attention = [obj for kind, obj in observers if kind == "attention"]
    driving = [obj for kind, obj in observers if kind != "attention"]
    viewer = config.run.pattern_heads != "none"
    tally = _Tally(notify, len(windows), bool(attention), driving, windows=len(windows.windows), extra=int(viewer))
    session = None
    if attention:
        session = Session(loaded.model, probes=attention, block_size=config.run.block_size,
                          query_fraction=config.run.query_fraction, probe_kernel=config.run.probe_kernel)
    if not sharded:
        shards = None
    if shards is not None:
        from attnlab.shards import run_settings, weights_id, windows_id

        size = windows.batch_size
        compare = None if runner.compare_record is None else runner.compare_record.get("file_sha256")
        shards.open(run_settings(config.to_dict(), weights_id(loaded), compare),
                    [windows_id([w["ids"] for w in windows.windows[i * size : (i + 1) * size]])
                     for i in range(len(windows))])
    return _Run(observers, loaded, runner, windows, session, tally, shards, sharded)


def _image_batches(config: RunConfig, loaded: Any, items: list[Any], notify: Progress) -> Any:
    """The image-text items as batches (:class:`attnlab.capture.vlm_inputs.ImageTextBatches`): every image read
    and every item encoded once here, so bad inputs fail before any probe runs. ConfigError for a text-only
    model."""
    from attnlab.capture.device_map import input_device
    from attnlab.capture.loading import parse_dtype
    from attnlab.capture.vlm_inputs import image_text_batches

    if loaded.processor is None:
        raise ConfigError(f"--image/--manifest need a vision-language model; {config.load.model} is text-only "
                          f"({loaded.facts.class_name})")
    notify(0, 0, "reading images")
    return image_text_batches(loaded.processor, items, batch_size=config.data.batch_size,
                              chat_template=config.inputs.use_chat_template,
                              image_token_ids=loaded.facts.image_token_ids,
                              tokens_per_image=(loaded.facts.vision or {}).get("tokens_per_image"),
                              device=input_device(loaded.model), dtype=parse_dtype(config.load.dtype))


def _run_probes(config: RunConfig, notify: Progress, model: Any, tokenizer: Any, command: str,
                shards: ShardStore | None) -> dict[str, Any] | None:
    from attnlab.distributed import agree

    started = time.perf_counter()
    run = agree("the set-up", lambda: _set_up(config, notify, model, tokenizer, shards))
    if run.shards is not None:
        run.shards.clear()
    if not run.sharded:
        return _finish(run, config, command, started, _single_pass(run))
    merged = gather_bundles(run.objects, _run_shards(run))  # the shard files stay until the results are written
    # rank 0 alone finishes (analyses' finish, the viewer pass, the results); the others wait in the same agreement,
    # so an error there stops every rank with one line instead of leaving them in the next collective
    return agree("finishing the run", lambda: None if merged is None else
                 _finish(run, config, command, started, load_bundle(run.objects, merged)))


def _finish(run: _Run, config: RunConfig, command: str, started: float, paths: dict[int, str]) -> dict[str, Any]:
    """Rank 0 (or the one process), once every state is merged: the analyses' ``finish``, the viewer's pattern
    pass, and the results dict."""
    loaded, windows, tally, runner, observers = run.loaded, run.windows, run.tally, run.runner, run.observers
    notify = tally.notify
    for obj in run.driving:
        with tally.call(obj, f"{obj.name}: finishing", finish=True):
            obj.finish(runner.get())
    patterns = _viewer_patterns(loaded, windows, config, tally)
    tally.done += int(patterns is not None or config.run.pattern_heads != "none")  # the pattern pass, planned as one
    notify(tally.done + tally.offset, tally.done + tally.offset, "done")

    def decode(token_id: int) -> str:
        return loaded.tokenizer.decode([token_id])

    results = results_envelope(
        command, config, loaded, bos_policy=windows.bos_policy, bos_added=windows.bos_added,
        attention_paths=paths, windows=windows.windows, rows=[row for _, obj in observers for row in obj.rows()],
        started=started, probe_args=dict(config.run.probe_args),
        extras={obj.name: obj.extras(decode) for _, obj in observers},
        sections=section_specs([obj for _, obj in observers]),
    )
    if runner.compare_record is not None:
        results["compare_model"] = runner.compare_record
    if getattr(windows, "inputs", None) is not None:  # image-text items (docs/vlm.md)
        results["inputs"] = windows.inputs
    if patterns is not None:
        results["patterns"] = patterns
    return results


def _single_pass(run: _Run) -> dict[int, str]:
    """One process with a plug-in that is not ``shardable``: the attention probes see every window in one
    Session, then each analysis observes every batch (no per-shard reset, export or merge); returns the paths."""
    import torch

    from attnlab.capture.vlm_inputs import batch_roles

    count = len(run.windows)
    if run.session is not None:
        with run.session, torch.no_grad():
            for number, batch in enumerate(run.windows):
                run.tally.step(f"running attention probes · batch {number + 1}/{count} · forward passes")
                with batch_roles(batch):
                    run.session.model(**batch)
                run.tally.done += 1
    for number, batch in enumerate(run.windows):
        for obj in run.driving:
            with run.tally.call(obj, f"{obj.name}: batch {number + 1}/{count}"):
                obj.observe(run.runner.get(), batch)
    return dict(run.session.attention_paths) if run.session is not None else {}


def _compute_shard(run: _Run, shard: int, empty: Bundle, unit: str) -> Bundle:
    """One shard from the objects' empty state: the attention probes in the Session (its sequence counter set to
    the shard's first global window, so hit lists name global windows), then each analysis's ``observe``; returns
    its bundle (saved when the run keeps shard files)."""
    import torch

    from attnlab.capture.vlm_inputs import batch_roles

    load_bundle(run.objects, empty, "the empty state")
    size, count = run.windows.batch_size, len(run.windows)
    # this shard's batch alone (iterating the Windows would build every earlier batch's tensors)
    (batch,) = dataclasses.replace(run.windows, windows=run.windows.windows[shard * size : (shard + 1) * size])
    if run.session is not None:
        run.session.num_sequences = shard * run.windows.batch_size
        run.session.attention_paths.clear()
        run.tally.step(f"running attention probes on {unit} {shard + 1}/{count}, forward passes")
        with run.session, torch.no_grad(), batch_roles(batch):
            run.session.model(**batch)
        run.tally.done += 1
    for obj in run.driving:
        with run.tally.call(obj, f"{obj.name}: {unit} {shard + 1}/{count}"):
            obj.observe(run.runner.get(), batch)
    bundle = bundle_of(run.objects, run.session.attention_paths if run.session is not None else {})
    if run.shards is not None:
        run.shards.write(shard, bundle)
    return bundle


def _run_shards(run: _Run) -> Bundle | None:
    """Run this rank's shards (module docstring); returns the bundle of its windows (None if it had none).

    Every rank makes ``ceil(shards / ranks)`` steps with one collective each (:meth:`_Tally.sync`: the progress
    sum and the error agreement); a shard that fails on one rank stops every rank at that step with one agreed
    line. Each shard is merged into this rank's :class:`attnlab.shards.Accumulator` in window order.
    ``fail_point`` (tests) fires after each completed shard.
    """
    from attnlab.distributed import World, fail_point, shard_range, world

    current, count, store = world(), len(run.windows), run.shards
    mine = shard_range(count, current)
    steps = len(shard_range(count, World(0, current.size)))  # rank 0 has the most shards
    empty = bundle_of(run.objects, {})
    items = hasattr(run.windows, "inputs")  # ImageTextBatches: image-text items, not text windows
    unit = ("item" if items else "window") if run.windows.batch_size == 1 else "batch"
    total = Accumulator(run.objects)
    for step in range(steps):
        error: Exception | None = None
        if step < len(mine):
            shard = mine[step]
            try:
                if store is not None and store.has(shard):
                    total.add(store.read(shard), str(store.path(shard)))
                    run.tally.step(f"{unit} {shard + 1}/{count} from {store.folder}", run.tally.per_shard())
                else:
                    total.add(_compute_shard(run, shard, empty, unit))
            except Exception as exc:  # noqa: BLE001 - agreed across ranks in sync (raised as is in one process)
                error = exc
            else:
                fail_point(step + 1)
        run.tally.sync(error)
    return total.bundle()


def _viewer_patterns(loaded: Any, windows: Any, config: RunConfig, tally: _Tally) -> dict[str, Any] | None:
    """The report viewer's ``"patterns"`` (:func:`attnlab.capture.pattern_report.report_patterns`): one extra forward
    pass on the first window's first ``pattern_tokens`` tokens; None for ``pattern_heads="none"`` or a model the
    Session cannot observe. It leaves every other result as it was."""
    if config.run.pattern_heads == "none":
        return None
    if getattr(windows, "inputs", None) is not None:  # the viewer's pass reads token ids alone, without images
        logger.info("no attention patterns for the report viewer on image inputs")  # explicit heads: ConfigError
        return None
    from attnlab.capture.pattern_report import report_patterns

    tally.step("attention patterns")
    return report_patterns(loaded, windows, config.run.pattern_heads, config.run.pattern_tokens,
                           block_size=config.run.block_size)
