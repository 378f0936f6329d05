"""The lm-evaluation-harness model ``attnlab``: a model loaded by attnlab, scored with attnlab edits applied.

From the shell (lm-eval's own command line, same flags, with ``attnlab`` registered first)::

    python -m attnlab.integrations.lm_eval --model attnlab \\
        --model_args 'pretrained=smollm2-135m,edits=temperature:tau=0.9' --tasks arc_easy

From Python::

    from lm_eval import simple_evaluate
    from attnlab.integrations.lm_eval import AttnlabLM
    lm = AttnlabLM(pretrained="smollm2-135m", edits="sink_window:sinks=4,window=252")
    results = simple_evaluate(model=lm, tasks=["arc_easy"])

Why a wrapper command and not plain ``lm_eval --model attnlab``: lm-eval 0.4.13 finds models only in its fixed
``lm_eval.models.MODEL_MAPPING`` and in what was registered in the running process (``register_model``). Its
registry accepts entry points as lazy targets, but nothing scans an entry-point group for models, and
``--include_path`` loads task YAML only. So :func:`main` calls :func:`register` and then lm-eval's own
``cli_evaluate`` (docs/lm_eval.md).

``model_args`` (docs/lm_eval.md):

- ``pretrained``: what :func:`attnlab.capture.loading.load_model` takes (a bundled name such as ``smollm2-135m``, a
  local model folder or ``.gguf`` file); it must be a causal LM.
- ``edits``: attnlab's ``--edit`` text (``attnlab ls edits``); several edits join with ``+``. lm-eval splits
  ``model_args`` at every comma, so the commas *between the parameters of one edit* are written ``;``:
  ``edits=sink_window:sinks=4;window=252+temperature:tau=0.9``. (In a JSON ``--model_args`` object and in Python,
  commas work too; no edit parameter takes a ``;``.)
- ``dtype`` (default ``float32``), ``device`` (default: CUDA if available, else CPU), ``batch_size`` (a whole
  number, default 1), ``max_length`` (default: the model config's, as lm-eval's HFLM resolves it),
  ``max_gen_toks`` (default 256), ``add_bos_token`` (default: the tokenizer's own rule), ``tokenizer`` (load the
  tokenizer from elsewhere).

The three request types follow lm-eval's HFLM definitions (natural-log probabilities):

- ``loglikelihood(context, continuation)`` → ``(Σ log p(token | prefix) over the continuation's tokens, is_greedy)``.
  Tokens: lm-eval's ``TemplateLM`` rule (trailing whitespace of the context moves to the continuation; the
  continuation's tokens are those of ``encode(context + continuation)`` after the first ``len(encode(context))``;
  an empty context becomes the prefix token: BOS, else EOS). Log-softmax in float32, summed in float64.
  ``is_greedy``: every continuation token is the arg-max (ties: lowest id). A pair longer than
  ``max_length + 1`` tokens keeps its last ``max_length + 1``.
- ``loglikelihood_rolling(text)``: lm-eval's disjoint rolling windows (``get_rolling_token_windows`` with
  ``context_len=1``) over ``encode(text)``, the first token predicted from the prefix token; the sum over windows.
- ``generate_until(context, gen_kwargs)``: greedy (arg-max) decoding with the KV cache, one request at a time,
  stopped by lm-eval's stop-sequence criteria at the first of ``gen_kwargs["until"]`` plus the EOS text, or after
  ``max_gen_toks`` tokens; returns the text before the first stop string. Sampling settings (``do_sample``,
  ``temperature``, ``top_p``, ``top_k``) are ignored, with one warning.

Every request runs inside ``Session(model, edits=...)`` (no edits: ``Session(model)``, the model's SDPA path);
batches are right-padded with an attention mask, so edits and position counting see only the real tokens. The
sessions' edit reports and the model record reach lm-eval's ``results["config"]`` through ``get_model_info``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from attnlab.errors import ConfigError, UsageError
from attnlab.progress import progress_to

logger = logging.getLogger(__name__)

MODEL_NAME = "attnlab"
PARAM_SEPARATOR = ";"  # stands for the comma between one edit's parameters inside lm-eval's comma-split model_args
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k")


def parse_edits_arg(edits: str | None) -> list[Any]:
    """The ``edits`` model argument → Edit instances (``;`` read as the comma between one edit's parameters).

    ``None``, ``""`` and ``"none"`` mean no edits.

    Raises:
        ConfigError: not a text, or a malformed spec / bad parameter (from :func:`attnlab.edits.parse_edit_list`).
        RegistryError: an unknown edit name (with a suggestion).
    """
    from attnlab.edits import parse_edit_list

    if edits is None:
        return []
    if not isinstance(edits, str):
        raise ConfigError(f"edits must be a text such as 'temperature:tau=0.9' (edits joined with '+', one edit's "
                          f"parameters with ';'), got {edits!r}")
    text = edits.strip()
    if not text or text.lower() == "none":
        return []
    return parse_edit_list(text.replace(PARAM_SEPARATOR, ","))


def _whole_number(name: str, value: Any) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())):
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    if int(value) < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    return int(value)


def _pick_device(device: str | None) -> str:
    """``device``, except that None, or a CUDA device while CUDA is unavailable, means CUDA if available else CPU
    (lm-eval's HFLM rule; lm-eval's CLI passes ``cuda:0`` unless told otherwise)."""
    if device is not None and not (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return str(device)
    chosen = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None:
        logger.warning("device %r is not available; using %r", device, chosen)
    return chosen


class AttnlabLM(TemplateLM):
    """lm-eval's ``LM`` over an attnlab-loaded causal LM, every request scored under the given edits.

    Args:
        pretrained: a bundled name, a local model folder or a ``.gguf`` file (:func:`load_model`).
        edits: attnlab edit text (module docstring), or None for the unedited model.
        dtype, device, tokenizer: passed to :func:`load_model`. ``device=None``, or a CUDA device while CUDA is
            unavailable (lm-eval's CLI passes ``cuda:0`` by default), means CUDA if available else CPU (HFLM's rule).
        batch_size: sequences per forward pass of ``loglikelihood``/``loglikelihood_rolling`` (whole number ≥ 1;
            lm-eval's ``"auto"`` is not supported). max_batch_size: accepted for lm-eval's interface, unused.
        max_length: tokens per forward pass; default from the model config (lm-eval's ``resolve_max_length``).
        max_gen_toks: default new-token limit of ``generate_until``.
        add_bos_token: None (the tokenizer's own rule), True or False: whether ``tok_encode`` adds special tokens.
        progress: report progress (:mod:`attnlab.progress`) unless lm-eval passes ``disable_tqdm``.

    Raises:
        ConfigError: bad edits or numbers, a model that is not a causal LM, a tokenizer without an EOS token.
        RegistryError / UsageError / AssetError: from :func:`load_model` and the edit registry.
    """

    def __init__(self, pretrained: str = "smollm2-135m", edits: str | None = None, *, dtype: str = "float32",
                 device: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 tokenizer: str | None = None, progress: bool = True) -> None:
        super().__init__()
        from lm_eval.models.utils import resolve_max_length

        from attnlab.capture.architectures import is_causal_lm
        from attnlab.capture.loading import load_model
        from attnlab.evaluation.runner import make_session

        self.edits = parse_edits_arg(edits)  # before loading, so a typo fails fast
        self.edits_text = "" if not self.edits else str(edits)
        self.batch_size_per_call = _whole_number("batch_size", batch_size)
        self._max_gen_toks = _whole_number("max_gen_toks", max_gen_toks)
        if add_bos_token not in (None, True, False):
            raise ConfigError(f"add_bos_token must be true, false or omitted, got {add_bos_token!r}")
        self.add_bos_token, self.progress = add_bos_token, progress
        self._warned_sampling = False  # generate_until warns once about ignored sampling settings
        self.loaded = load_model(pretrained, dtype=dtype, device=_pick_device(device), tokenizer=tokenizer)
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        if not is_causal_lm(self.model):
            raise ConfigError(f"lm-eval's attnlab model needs a causal LM, got {type(self.model).__name__} "
                              f"({pretrained!r})")
        if self.tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {pretrained!r} has no EOS token; lm-eval needs one (end of text)")
        self.pretrained = str(pretrained)
        self._device = next(self.model.parameters()).device
        self._max_length = (_whole_number("max_length", max_length) if max_length is not None
                            else resolve_max_length(self.model.config, self.tokenizer))
        make_session(self.model, self.edits)  # checks the edits against the model (layers, heads) before any request
        self.edit_reports: dict[str, list[dict[str, Any]]] = {}

    # lm-eval's constructors -----------------------------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> AttnlabLM:
        """lm-eval's ``--model_args`` text → an instance; see :meth:`create_from_arg_obj`."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> AttnlabLM:
        """``model_args`` plus lm-eval's own ``batch_size``/``max_batch_size``/``device`` → an instance.

        A key given in ``model_args`` wins over lm-eval's value for it (lm-eval's CLI always passes its
        ``--batch_size``, default 1), so ``batch_size=8`` inside ``model_args`` works.

        Raises:
            ConfigError: a key that is not an argument of :class:`AttnlabLM` (one line; names the ``;`` rule,
                since a raw comma inside ``edits=`` splits one edit's parameters into separate keys).
        """
        import inspect

        known = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = [key for key in arg_dict if key not in known]
        if unknown:
            key = unknown[0]
            raise ConfigError(f"model_args key {key!r} is not an attnlab argument (expected one of "
                              f"{', '.join(known)}); inside edits= write the commas of one edit as "
                              f"'{PARAM_SEPARATOR}' (edits=sink_window:sinks=4{PARAM_SEPARATOR}window=252)")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # lm-eval's tokenizer interface ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context becomes, and the first rolling window's context: BOS, else EOS (as HFLM)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_call

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``; with ``add_special_tokens=None`` the model's ``add_bos_token`` setting (else
        the tokenizer's rule) applies, except that a string already starting with the BOS text gets none (HFLM)."""
        options = {}
        if add_special_tokens is not None:
            options["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            options["add_special_tokens"] = self.add_bos_token
        bos_text = self.tokenizer.decode([self.prefix_token_id])
        if add_special_tokens is None and bos_text and string.startswith(bos_text):
            options["add_special_tokens"] = False
        return list(self.tokenizer.encode(string, **options))

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # sessions -------------------------------------------------------------------------------------------------
    def _run(self, request_type: str, work: Any, total: int, disable_tqdm: bool) -> Any:
        """``work(report)`` inside the edits' Session and ``torch.no_grad``; keeps the session's edit report."""
        from attnlab.evaluation.runner import edit_report, make_session

        session = make_session(self.model, self.edits)
        with progress_to(self.progress and not disable_tqdm) as progress, torch.no_grad(), session:
            progress(0, total, f"lm-eval {request_type}")
            result = work(lambda done: progress(done, total, f"lm-eval {request_type}"))
        self.edit_reports[request_type] = edit_report(session, self.edits)
        return result

    # loglikelihood ------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              request_type: str = "loglikelihood", **kwargs: Any) -> list[tuple[float, bool]]:
        """``(log-likelihood, is_greedy)`` per ``(cache key, context ids, continuation ids)`` (module docstring);
        ``request_type`` names the edit report and the progress line."""
        rows = []
        for _, context_ids, continuation_ids in requests:
            if not continuation_ids:
                raise ConfigError("a continuation encodes to no tokens; lm-eval's loglikelihood needs at least one")
            if len(continuation_ids) > self.max_length:
                raise ConfigError(f"a continuation of {len(continuation_ids)} tokens does not fit "
                                  f"max_length={self.max_length}")
            whole = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1):]
            rows.append((whole[:-1], list(continuation_ids)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: little padding per batch
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)

        def work(report: Any) -> None:
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                for index, score in zip(batch, self._score_batch([rows[i] for i in batch])):
                    results[index] = score
                report(min(start + self.batch_size, len(order)))

        self._run(request_type, work, len(order), disable_tqdm)
        for (key, _, _), score in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return results

    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One right-padded forward pass; rows are ``(input ids, continuation ids)`` whose continuation is the
        last ``len(continuation)`` tokens predicted by the inputs' last positions."""
        from attnlab.evaluation.lm_tasks import accepts_logits_to_keep

        width = max(len(inputs) for inputs, _ in rows)
        input_ids = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)  # (batch, width)
        attention_mask = torch.zeros_like(input_ids)
        for r, (inputs, _) in enumerate(rows):
            input_ids[r, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
            attention_mask[r, :len(inputs)] = 1
        keep = width - min(len(inputs) - len(targets) for inputs, targets in rows)  # last positions any row scores
        extra = {"logits_to_keep": keep} if accepts_logits_to_keep(self.model) else {}
        logits = self.model(input_ids=input_ids.to(self._device), attention_mask=attention_mask.to(self._device),
                            **extra).logits[:, -keep:].float()  # (batch, keep, vocab)
        log_probs = torch.log_softmax(logits, dim=-1)
        scores = []
        for r, (inputs, targets) in enumerate(rows):
            first = len(inputs) - len(targets) - (width - keep)  # the first scored position among the kept ones
            row = log_probs[r, first:first + len(targets)]  # (num_targets, vocab)
            target = torch.tensor(targets, dtype=torch.long, device=row.device)
            logprob = float(row.gather(-1, target[:, None]).double().sum())
            scores.append((logprob, bool((row.argmax(dim=-1) == target).all())))
        return scores

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each ``(text,)`` request over lm-eval's disjoint rolling windows."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            token_windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)
            for context_ids, continuation_ids in map(lm_utils.make_disjoint_window, token_windows):
                windows.append((None, context_ids, continuation_ids))
                owners.append(index)
        totals = [0.0] * len(requests)
        if windows:
            scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm,
                                                request_type="loglikelihood_rolling")
            for owner, (logprob, _) in zip(owners, scores):
                totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # generation -----------------------------------------------------------------------------------------------
    def _generation_settings(self, gen_kwargs: Any) -> tuple[list[str], int]:
        """``(stop strings incl. the EOS text, max new tokens)`` from a request's gen_kwargs (HFLM's reading)."""
        if not isinstance(gen_kwargs, dict):
            raise ConfigError(f"generate_until expects gen_kwargs as a dict, got {type(gen_kwargs).__name__}")
        until = gen_kwargs.get("until") or []
        until = [stop for stop in ([until] if isinstance(until, str) else list(until)) if stop]
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        if eos and eos not in until:
            until.append(eos)
        sampling = {k: gen_kwargs[k] for k in SAMPLING_KEYS if gen_kwargs.get(k) not in (None, False, 0, 0.0)}
        if sampling and not self._warned_sampling:
            logger.warning("the attnlab model decodes greedily; ignoring %s", sampling)
            self._warned_sampling = True
        return until, _whole_number("max_gen_toks", gen_kwargs.get("max_gen_toks", self.max_gen_toks))

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each ``(context, gen_kwargs)`` request, cut at its first stop string."""
        from lm_eval.models.utils_hf import stop_sequences_criteria

        texts: list[str] = []

        def work(report: Any) -> None:
            for request in requests:
                context, gen_kwargs = request.args
                until, max_new = self._generation_settings(gen_kwargs)
                ids = self.tok_encode(context)[-max(1, self.max_length - max_new):] or [self.prefix_token_id]
                input_ids = torch.tensor([ids], dtype=torch.long, device=self._device)  # (1, context tokens)
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new,
                    do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                    stopping_criteria=stop_sequences_criteria(self.tokenizer, until, input_ids.shape[1], 1),
                    pad_token_id=self.eot_token_id)
                text = self.tok_decode(output[0, input_ids.shape[1]:].tolist())
                for stop in until:
                    text = text.split(stop)[0]
                self.cache_hook.add_partial("generate_until", request.args, text)
                texts.append(text)
                report(len(texts))

        self._run("generate_until", work, len(requests), disable_tqdm)
        return texts

    # provenance -----------------------------------------------------------------------------------------------
    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval adds to ``results["config"]``: the model record, the edits and their edit reports."""
        return {"attnlab_model": self.loaded.model_record(self.pretrained), "attnlab_edits": self.edits_text,
                "attnlab_edit_report": self.edit_reports}


def register() -> None:
    """Register :class:`AttnlabLM` as lm-eval's model ``attnlab`` (idempotent).

    lm-eval's own models are registered first: its ``get_model`` loads them only while its registry is empty.
    """
    import lm_eval.models  # noqa: F401  (lm-eval's lazy MODEL_MAPPING entries)
    from lm_eval.api.registry import register_model

    register_model(MODEL_NAME)(AttnlabLM)


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line (``lm_eval --help``; same flags) with the model ``attnlab`` registered.

    ``argv`` replaces ``sys.argv[1:]`` when given. attnlab's usage errors (bad ``model_args``) print one line
    to stderr and return 2.
    """
    from lm_eval.__main__ import cli_evaluate

    register()
    saved = sys.argv
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]  # lm-eval's parser reads sys.argv; restored below
    try:
        cli_evaluate()
    except UsageError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    from attnlab.integrations.lm_eval import main as _main  # the importable module registers, not this __main__ copy

    sys.exit(_main())
