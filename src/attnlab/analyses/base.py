"""The analysis contract: what an analysis is given and what it returns.

An analysis is prepared once with the model's :class:`attnlab.facts.ModelFacts`, then sees every batch of windows
through a :class:`Runner` (``observe``), is told when the windows end (``finish``), and returns long-format rows
and extras like a probe does (docs/results.md).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from torch import Tensor

from attnlab.facts import ModelFacts

Row = dict[str, Any]


class Runner(Protocol):
    """What an analysis may ask of the model (implemented by :class:`attnlab.capture.model_probes.ModelRunner`)."""

    facts: ModelFacts

    def forward(self, batch: dict[str, Tensor], **options: Any) -> Any: ...

    def decode(self, token_id: int) -> str: ...


class Analysis:
    """Base class of every analysis. Subclasses set ``name`` and override the hooks they use.

    Attributes:
        needs_compare: True if the analysis compares two models (``attnlab probe --compare OTHER``).
    """

    name: ClassVar[str] = ""
    needs_compare: ClassVar[bool] = False

    def prepare(self, facts: ModelFacts, runner: Runner) -> None:
        """Called once before the first batch."""
        self.facts = facts

    def observe(self, runner: Runner, batch: dict[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Called for every batch of windows: ``input_ids``, ``attention_mask`` (batch, seq_len)."""

    def finish(self, runner: Runner) -> None:  # noqa: B027 - optional hook
        """Called once after the last batch."""

    def rows(self) -> list[Row]:
        """Long-format rows for results.csv."""
        return []

    def extras(self, decode: Any = None) -> dict[str, Any]:
        """JSON-serialisable extras; ``decode(token_id) -> str`` when a tokenizer is known."""
        return {}
