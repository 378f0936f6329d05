"""Model-level probes: diagnostics that need more than one attention call's probs.

Some quantities of the seed papers are properties of a whole forward (or backward) pass: gradients of the loss
(inflection layers), two models on the same tokens (CKA), sentence embeddings (length collapse), a pass with and
without a context span (head divergence), or the loss with a head ablated (head importance). Such a probe
subclasses :class:`ModelProbe` (``needs = {"model"}``); it is not run inside a :class:`attnlab.Session` but by
:func:`attnlab.pipeline.run_probes`, which calls

- ``prepare(info)`` once with a :class:`ModelInfo` (sizes, rope settings, tokenizer-backed helpers);
- ``observe(runner, batch)`` for every batch of windows (``batch`` = ``input_ids``/``attention_mask``);
- ``finish(runner)`` once at the end;

and then ``rows()``/``extras()`` as for every probe. ``runner`` is a :class:`attnlab.capture.model_probes.ModelRunner`
(the only object that touches transformers); its methods are documented there. Attention-level probes may define
``prepare(info)`` too, to read sizes or token strings they cannot see in an attention call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from torch import Tensor

from attnlab.errors import ConfigError
from attnlab.probes.base import Probe


@dataclass
class ModelInfo:
    """What a probe may need to know about the model and tokenizer before it sees data.

    Attributes:
        num_layers, num_heads, num_kv_heads, head_dim: sizes (query heads; ``head_dim`` of queries/keys).
        hidden_size: width of the residual stream.
        causal: whether the model is a causal decoder (False for encoders such as BERT).
        rope_theta: RoPE base, or None when the model uses no rotary embedding.
        bos_token_id: the tokenizer's BOS (or CLS) id, or None.
        decode: ``decode(token_id) -> str`` (identity-like ``str`` when no tokenizer is known).
        vocab_strings: ``vocab_strings()`` -> list of every token's decoded string (index = id), lazily built.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    causal: bool = True
    rope_theta: float | None = None
    bos_token_id: int | None = None
    decode: Callable[[int], str] = str
    vocab_strings: Callable[[], list[str]] = field(default=lambda: [])


class ModelProbe(Probe):
    """Base class of probes that drive the model themselves (see the module docstring)."""

    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def bind(self, shape: Any) -> None:
        """A Session binds its probes; a model-level probe cannot run there, so this raises ConfigError."""
        raise ConfigError(f"probe {self.name} drives the model itself; run it with `attnlab probe` / "
                          "attnlab.pipeline.run_probes")

    def prepare(self, info: ModelInfo) -> None:
        """Called once before the first batch."""
        self.info = info

    def observe(self, runner: Any, batch: dict[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Called for every batch of windows: ``input_ids``, ``attention_mask`` (batch, seq_len)."""

    def finish(self, runner: Any) -> None:  # noqa: B027 - optional hook
        """Called once after the last batch."""


def is_model_probe(probe: Probe) -> bool:
    """Whether ``probe`` is run by the probe suite's model runner instead of inside a Session."""
    return "model" in probe.needs
