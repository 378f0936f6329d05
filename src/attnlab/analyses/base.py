"""The analysis contract: what an analysis is given, what it may ask of the model, and what it returns.

An analysis is prepared once with the model's :class:`attnlab.facts.ModelFacts` and a :class:`Runner`
(``prepare``), then sees every batch of windows through the runner (``observe``), is told when the windows end
(``finish``), and returns long-format rows and extras like a probe does (docs/results.md). The runner is the only
object that touches transformers (:class:`attnlab.capture.runner.ModelRunner` implements it); an analysis
changes the model only through edits (:mod:`attnlab.edits`), which the runner applies inside an
:class:`attnlab.Session` that checks every edit fired.

Shapes: B batch, L seq_len, V vocab, D hidden_size, H num_heads, Hkv num_kv_heads, Dv head_dim of values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn

from attnlab.errors import ConfigError
from attnlab.facts import ModelFacts
from attnlab.probes.base import Measurement

Row = dict[str, Any]


@dataclass
class ForwardRecord:
    """What one :meth:`Runner.forward` call observed.

    Attributes:
        logits: (B, L, V) float32, or None for models without an LM head.
        last_hidden: (B, L, D), the model's final hidden states (after the final norm).
        layer_outputs: per block, (B, L, D) residual stream after block l (detached).
        head_outputs: per block, (B, L, H, Dv) head outputs before W_O (after any edit), or None.
        token_loss: (B, L - 1) next-token cross-entropy (nats), 0 where ``target_valid`` is False; None for models
            without logits.
        target_valid: (B, L - 1) bool, True where both the token and the next one are real.
        activation_grad_norm, param_grad_norm: (num_layers,) float64 with ``gradients=True``, else None.
    """

    logits: Tensor | None
    last_hidden: Tensor
    layer_outputs: list[Tensor]
    head_outputs: list[Tensor] | None
    token_loss: Tensor | None
    target_valid: Tensor
    activation_grad_norm: Tensor | None = None
    param_grad_norm: Tensor | None = None

    def mean_loss(self) -> Tensor:
        """(B,) mean next-token loss over each sequence's real targets (NaN without targets).

        Raises ConfigError for a model without an LM head.
        """
        if self.token_loss is None:
            raise ConfigError("the model has no LM head, so there is no next-token loss")
        count = self.target_valid.sum(-1).double()
        return (self.token_loss.double() * self.target_valid).sum(-1) / count


@runtime_checkable
class Runner(Protocol):
    """What an analysis may ask of the model: exactly the members the built-in analyses use.

    A ``batch`` is a dict with ``input_ids`` (B, L) long and optionally ``attention_mask`` (B, L), 1 = real token.

    Attributes:
        facts: the model's sizes and provenance.
        model: the transformers model (eval mode); analyses read its modules (memory_fidelity) and device.
        tokenizer: its tokenizer (``tokenizer(text, add_special_tokens=False)["input_ids"]``, ``all_special_ids``),
            or None.
        other: a second runner on another model with the same tokenizer (``--compare``), or None.
        bos_policy: ``"always"``/``"never"``/``"auto"``: the BOS policy for text an analysis loads itself, so a
            second text's windows are cut like the run's.
    """

    facts: ModelFacts
    model: nn.Module
    tokenizer: Any
    other: Runner | None
    bos_policy: str

    def forward(self, batch: dict[str, Tensor], *, head_outputs: bool = False, gradients: bool = False,
                head_scale: dict[int, Tensor] | None = None, first_key: dict[int, Tensor] | None = None,
                edits: Sequence[Any] = ()) -> ForwardRecord:
        """One forward pass (one backward pass of the mean loss with ``gradients=True``), see ForwardRecord.

        ``head_scale`` {layer: (H,) factors} and ``first_key`` {layer: (H,) bool} become the ``head_scale`` and
        ``first_key`` edits; ``edits`` are any further edits. Raises EditNotFiredError if an edit never acted.
        """
        ...

    def attention_probs(self, batch: dict[str, Tensor], *, with_values: bool = False) -> Any:
        """Per layer (B, H, L, L) float32 probs on CPU (padding rows 0); with ``with_values`` also the values
        (B, Hkv, L, Dv) per layer, as ``(probs, values)``. Memory ∝ H · L²: short sequences only."""
        ...

    def encode(self, id_lists: Sequence[Sequence[int]], *, device: Any = None) -> dict[str, Tensor]:
        """A right-padded batch from token id lists, with the tokenizer's special tokens added."""
        ...

    def decode(self, token_id: int) -> str:
        """One token's text (``str(token_id)`` without a tokenizer)."""
        ...

    def vocab_strings(self) -> list[str]:
        """Every token's decoded string, index = id (empty without a tokenizer)."""
        ...

    @property
    def bos_token_id(self) -> int | None:
        """The tokenizer's BOS (or CLS) id, or None."""
        ...

    def load_windows(self, text: str, *, seq_len: int, max_windows: int) -> Any:
        """Windows of a second text (:func:`attnlab.text.load_text`) cut like the run's (``bos_policy``), on the
        model's device; iterating gives batches."""
        ...


class Analysis(Measurement):
    """Base class of every analysis. Subclasses override the hooks they use; ``@ANALYSES.register`` names them.

    An analysis that makes many passes inside one ``observe`` or ``finish`` call (one per head) reports them with
    :meth:`report_progress` and declares their number after ``prepare`` (:meth:`planned_steps`); the pipeline turns
    that into overall progress (``active_dormant: window 1/2 · head 37/270``) whose total is known from the start.

    Attributes:
        needs_compare: True if the analysis compares two models (``attnlab probe --compare OTHER``).
        shardable: True when :meth:`export_state`/:meth:`import_state` capture the whole state after any number
            of ``observe`` calls and ``merge`` combines such states (the windows merged in order); ``finish`` then
            runs once, on the merged state. False by default (a plug-in opts in): a run over several processes
            refuses the analysis with a ConfigError naming it, and a one-process run writes no shard files.
    """

    needs_compare: ClassVar[bool] = False
    shardable: ClassVar[bool] = False
    _progress_hook: Callable[[int, int, str], None] | None = None

    def set_progress(self, hook: Callable[[int, int, str], None] | None) -> None:
        """Set (or clear, with None) where :meth:`report_progress` goes; the pipeline sets it around each call."""
        self._progress_hook = hook

    def planned_steps(self, batches: int, windows: int) -> tuple[int, int]:
        """The inner steps this analysis will report, for overall progress planned from the start: ``(per
        observe call, in finish)`` for a run of ``batches`` batches holding ``windows`` windows; called after
        :meth:`prepare`. The default ``(1, 0)``: each ``observe`` call is one step and ``finish`` reports none."""
        return 1, 0

    def report_progress(self, done: int, total: int, what: str) -> None:
        """Report ``done`` of ``total`` inner steps of the current ``observe``/``finish`` call; ``what`` names the
        step (``"head"``). Counts restart at each call; nothing happens outside a pipeline run."""
        if self._progress_hook is not None:
            self._progress_hook(done, total, what)

    def prepare(self, facts: ModelFacts, runner: Runner) -> None:
        """Called once before the first batch."""
        self.facts = facts

    def observe(self, runner: Runner, batch: dict[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Called for every batch of windows: ``input_ids``, ``attention_mask`` (B, L)."""

    def finish(self, runner: Runner) -> None:  # noqa: B027 - optional hook
        """Called once after the last batch."""

