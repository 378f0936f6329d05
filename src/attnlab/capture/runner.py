"""The runner of analyses: whole forward/backward passes, head interventions through the edits.

:class:`ModelRunner` implements :class:`attnlab.analyses.base.Runner`, giving an analysis what one attention call
cannot:

- ``forward(batch, ...)`` runs the model once and returns a :class:`attnlab.analyses.base.ForwardRecord`: logits,
  each transformer block's output (the residual stream after block l), optionally every head's output before the
  output projection (read by a forward pre-hook on the block's ``o_proj``, GPT-2's Conv1D ``c_proj``, ...:
  ``OUTPUT_PROJECTIONS``; METHODS.md notation o^{l,h}), the
  per-token next-token loss and, with ``gradients=True``, one backward pass of the mean loss giving ‖∂L/∂h_l‖ and
  the parameter-gradient norm of every block.
- head interventions in the same pass go through the edits, inside an :class:`attnlab.Session` (which raises
  EditNotFiredError on exit if an edit never acted): ``head_scale`` multiplies a head's output (0 = ablation;
  the ``head_scale`` edit) and ``first_key`` makes a head attend one-hot to the first real key (the ``first_key``
  edit with α = 1, Guo et al. 2024, "MoveAttentionToBOS", METHODS.md #3). The hooks only read.
- ``attention_probs(batch)`` returns full probs per layer (a Session with a collecting probe; short sequences
  only: memory ∝ num_heads · seq_len²).
- ``encode(id_lists)`` builds a right-padded batch from token id lists, adding the tokenizer's special tokens.

Hooks are registered for one call and removed in ``finally``; the model's weights and settings are not changed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from attnlab.analyses.base import ForwardRecord
from attnlab.capture.architectures import get_submodule_or_none, model_facts, transformer_blocks
from attnlab.capture.device_map import input_device
from attnlab.errors import ConfigError, UnsupportedModelError
from attnlab.facts import ModelFacts
from attnlab.capture.patterns import PatternProbe
from attnlab.probes.base import AttentionCall

# the attention output projection inside a transformer block, by family: its input (batch, seq_len,
# num_heads * head_dim) holds the per-head outputs, head-major. Each family here is tested on a tiny model
# (tests/analyses/test_gpt2_heads.py, test_head_families.py). Head outputs are read by a hook, but head edits (and the
# analyses that ablate or patch heads) also need a model that routes attention through transformers'
# AttentionInterface (attnlab.Session); GPT-Neo, Falcon and BLOOM do not, so they are not listed.
OUTPUT_PROJECTIONS = (
    "self_attn.o_proj",  # Llama, Mistral, Qwen, Gemma, OLMo, Phi-3
    "attention.output.dense",  # BERT, RoBERTa
    "self_attn.out_proj",  # OPT
    "attention.dense",  # GPT-NeoX
    "attn.c_proj",  # GPT-2 (a transformers Conv1D: y = x @ W + b with W (in, out))
    "attn.out_proj",  # GPT-J
    "self_attn.dense",  # Phi-1/2
)
FAMILIES = "Llama-, BERT-, OPT-, GPT-NeoX-, GPT-2-, GPT-J- and Phi-style"
HEAD_EDITS_NEED = "head edits also need a model that routes attention through transformers' AttentionInterface"


def _is_projection(module: object) -> bool:
    """An nn.Linear, or transformers' Conv1D (GPT-2's projections: a Linear with its weight transposed)."""
    return isinstance(module, (nn.Linear, Conv1D))


def _output_projection(block: nn.Module) -> nn.Module | None:
    for path in OUTPUT_PROJECTIONS:
        out = get_submodule_or_none(block, path)
        if _is_projection(out):
            return out
    return None


def head_edits(head_scale: dict[int, Tensor] | None, first_key: dict[int, Tensor] | None) -> list[Any]:
    """The edits equivalent to per-layer head selections: ``head_scale`` {layer: (num_heads,) factors} gives one
    ``head_scale`` edit per distinct factor ≠ 1; ``first_key`` {layer: (num_heads,) bool} one ``first_key`` edit
    (α = 1) per layer with a selected head.

    Raises:
        ConfigError: a selection that is not one vector per layer (per-sequence selections are not edits).
    """
    from attnlab.edits import EDITS

    edits: list[Any] = []
    for option, selections in (("first_key", first_key), ("head_scale", head_scale)):
        for layer, selection in sorted((selections or {}).items()):
            selection = torch.as_tensor(selection).detach().cpu()
            if selection.dim() != 1:
                raise ConfigError(f"{option} takes one (num_heads,) vector per layer, got shape "
                                  f"{tuple(selection.shape)} for layer {layer}")
            if option == "first_key":
                heads = selection.bool().nonzero().flatten().tolist()
                if heads:
                    edits.append(EDITS.get("first_key")(alpha=1.0, layers=[int(layer)], heads=heads))
                continue
            for factor in sorted({float(x) for x in selection.tolist()} - {1.0}):
                heads = (selection.double() == factor).nonzero().flatten().tolist()
                edits.append(EDITS.get("head_scale")(scale=factor, layers=[int(layer)], heads=heads))
    return edits


class _ProbsCollector(PatternProbe):
    """Every head's probs (a :class:`attnlab.capture.patterns.PatternProbe` over all layers and heads), plus the value
    states each layer's attention received."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[int, Tensor] = {}

    def begin_call(self, call: AttentionCall) -> None:
        super().begin_call(call)
        self.values[call.layer_idx] = call.value.float().cpu()  # (B, Hkv, Lk, Dv)


def next_token_loss(logits: Tensor, input_ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy of predicting token t+1 at t; returns (loss (B, L-1), target_valid (B, L-1))."""
    target_valid = valid[:, :-1] & valid[:, 1:]
    loss = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return loss * target_valid, target_valid


class ModelRunner:
    """Runs a transformers model for analyses (see the module docstring); implements the analyses' Runner.

    Args:
        model: a transformers model (causal LM or encoder) in eval mode.
        tokenizer: its tokenizer, or None (then ``encode`` needs ids that already carry special tokens).
        facts: the model's :class:`attnlab.facts.ModelFacts` (built from the model when None).

    Raises:
        UnsupportedModelError: the transformer blocks of the model are not found.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, facts: ModelFacts | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.facts = facts if facts is not None else model_facts(model)
        self.other: ModelRunner | None = None  # a second model (set by the probe suite for --compare)
        # BOS policy for text the analyses load themselves (text B); the probe suite sets the run's resolved one
        self.bos_policy = "auto"
        self.blocks = transformer_blocks(model)
        if self.blocks is None:
            raise UnsupportedModelError(f"cannot find the transformer blocks of {type(model).__name__}")
        self._vocab: list[str] | None = None

    # tokenizer helpers --------------------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        """The tokenizer's BOS id, else its CLS id, else None."""
        tok = self.tokenizer
        if tok is None:
            return None
        return tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)]) if self.tokenizer is not None else str(token_id)

    def vocab_strings(self) -> list[str]:
        """Every token's decoded string, index = id (cached)."""
        if self._vocab is None:
            size = len(self.tokenizer) if self.tokenizer is not None else 0
            self._vocab = self.tokenizer.batch_decode([[i] for i in range(size)]) if size else []
        return self._vocab

    def encode(self, id_lists: Sequence[Sequence[int]], *, device: Any = None) -> dict[str, Tensor]:
        """Right-padded batch (``input_ids``, ``attention_mask``) from token ids, with the tokenizer's specials
        around each sequence (:func:`attnlab.text.special_tokens`: [CLS] … [SEP] for BERT, none for most decoders)."""
        from attnlab.text import special_tokens

        tok = self.tokenizer
        if tok is not None:
            prefix, suffix = special_tokens(tok)
            id_lists = [prefix + list(ids) + suffix for ids in id_lists]
        pad = (tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0)
        length = max(len(ids) for ids in id_lists)
        input_ids = torch.full((len(id_lists), length), pad, dtype=torch.long)
        mask = torch.zeros(len(id_lists), length, dtype=torch.long)
        for i, ids in enumerate(id_lists):
            input_ids[i, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            mask[i, : len(ids)] = 1
        device = device or input_device(self.model)
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}

    def load_windows(self, text: str, *, seq_len: int, max_windows: int) -> Any:
        """Windows of a second text cut like the run's (``bos_policy``), on the model's device."""
        from attnlab.text import load_text

        return load_text(self.tokenizer, text, seq_len=seq_len, max_windows=max_windows, bos=self.bos_policy,
                         device=input_device(self.model))

    # hooks (read only) --------------------------------------------------------------------------------------
    @contextmanager
    def _hooks(self, record: dict[str, Any], *, head_outputs: bool, gradients: bool) -> Iterator[None]:
        handles = []
        H = self.facts.num_heads
        try:
            for layer, block in enumerate(self.blocks):
                def block_hook(module: nn.Module, args: Any, output: Any, layer: int = layer) -> None:
                    hidden = output[0] if isinstance(output, (tuple, list)) else output
                    if gradients and hidden.requires_grad:
                        hidden.retain_grad()
                    record["layers"][layer] = hidden
                handles.append(block.register_forward_hook(block_hook))
                if not head_outputs:
                    continue
                out = _output_projection(block)
                if out is None:
                    raise UnsupportedModelError(
                        f"cannot find the attention output projection of block {layer} in {type(self.model).__name__}"
                        f"; head outputs are read in {FAMILIES} blocks ({HEAD_EDITS_NEED})")

                def out_hook(module: nn.Module, args: tuple, layer: int = layer) -> None:
                    B, L, width = args[0].shape
                    record["heads"][layer] = args[0].detach().view(B, L, H, width // H)
                handles.append(out.register_forward_pre_hook(out_hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    # passes -------------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], *, head_outputs: bool = False, gradients: bool = False,
                head_scale: dict[int, Tensor] | None = None, first_key: dict[int, Tensor] | None = None,
                edits: Sequence[Any] = ()) -> ForwardRecord:
        """One forward pass (and one backward pass of the mean next-token loss with ``gradients=True``).

        Args:
            batch: ``input_ids`` (batch, seq_len) and optionally ``attention_mask`` (batch, seq_len), 1 = real; a
                vision-language batch adds its image inputs (``pixel_values``, ``image_grid_thw``, …), passed on
                to the model, and may carry an ``answer_mask`` (not passed on).
            head_outputs: record every head's output before W_O (after the edits).
            gradients: backpropagate the mean next-token loss over all real targets of the batch.
            head_scale: {layer: (num_heads,) multipliers of the head outputs} (the ``head_scale`` edit).
            first_key: {layer: (num_heads,) bool}: these heads attend one-hot to the first real key (the
                ``first_key`` edit, α = 1).
            edits: further Edit instances or specs (``attnlab ls edits``).
        With any edit the pass runs inside an :class:`attnlab.Session`, which checks on exit that each edit fired.

        Raises:
            UnsupportedModelError: ``head_outputs`` on a block whose output projection is not found.
            ConfigError: ``gradients=True`` for a model without an LM head, or whose device map offloads weights
                (they sit on ``meta`` and would get no gradient); a selection that is not 1-D.
            EditNotFiredError: an edit acted on no attention call.
        """
        from attnlab.capture.session import Session

        if gradients and any(parameter.device.type == "meta" for parameter in self.model.parameters()):
            raise ConfigError("parameter gradients need every weight in memory, but the device map offloads some "
                              "(\"disk\", or \"cpu\" beside a GPU); use a map without offload")

        input_ids = batch["input_ids"]
        valid = batch.get("attention_mask", torch.ones_like(input_ids)).bool()
        all_edits = [*head_edits(head_scale, first_key), *edits]
        record: dict[str, Any] = {"layers": {}, "heads": {}}
        # image inputs (pixel_values, image_grid_thw, …) ride along; answer_mask marks scored tokens, not an input
        extra = {key: value for key, value in batch.items() if key not in ("input_ids", "attention_mask", "answer_mask")}
        kwargs = {**extra, "input_ids": input_ids, "attention_mask": valid.long()}
        session = Session(self.model, edits=all_edits) if all_edits else nullcontext()
        with self._hooks(record, head_outputs=head_outputs, gradients=gradients), session:
            with torch.set_grad_enabled(gradients):
                output = self.model(**kwargs, output_hidden_states=True)
        logits = getattr(output, "logits", None)
        hidden = output.hidden_states[-1] if getattr(output, "hidden_states", None) is not None \
            else output.last_hidden_state
        token_loss, target_valid = None, valid[:, :-1] & valid[:, 1:]
        if logits is not None:
            token_loss, target_valid = next_token_loss(logits, input_ids, valid)
        act_norm = param_norm = None
        L = self.facts.num_layers
        if gradients:
            if token_loss is None:
                raise ConfigError("gradient analyses need a model with an LM head (a causal LM)")
            loss = token_loss.sum() / target_valid.sum().clamp(min=1)
            params = [p for p in self.model.parameters() if p.requires_grad]
            layers = [record["layers"][i] for i in range(L)]
            grads = torch.autograd.grad(loss, layers + params, allow_unused=True)
            act_norm = torch.tensor([float(g.double().norm()) if g is not None else 0.0
                                     for g in grads[: len(layers)]], dtype=torch.float64)
            by_param = {id(p): g for p, g in zip(params, grads[len(layers):])}
            param_norm = torch.tensor([
                float(sum(float(by_param[id(p)].double().pow(2).sum()) for p in block.parameters()
                          if by_param.get(id(p)) is not None)) ** 0.5
                for block in self.blocks], dtype=torch.float64)
            token_loss = token_loss.detach()
            logits = logits.detach()
        outputs = [record["layers"][i].detach() for i in range(L)]
        heads = [record["heads"][i] for i in range(L)] if head_outputs else None
        return ForwardRecord(logits=logits.float() if logits is not None else None, last_hidden=hidden.detach(),
                             layer_outputs=outputs, head_outputs=heads,
                             token_loss=token_loss.detach() if token_loss is not None else None,
                             target_valid=target_valid, activation_grad_norm=act_norm, param_grad_norm=param_norm)

    def attention_probs(self, batch: dict[str, Tensor], *, with_values: bool = False) -> Any:
        """Full probs per layer, each (batch, num_heads, seq_len, seq_len) float32 on CPU; padding rows are 0.

        With ``with_values=True`` returns ``(probs, values)``, values per layer (batch, num_kv_heads, seq_len,
        head_dim) as the attention function received them.
        """
        from attnlab.capture.session import Session

        collector = _ProbsCollector()
        with Session(self.model, probes=[collector]), torch.no_grad():
            self.model(**batch)
        pattern = collector.patterns()[0]
        probs = [pattern.probs[:, slot] for slot in range(len(pattern.layers))]
        if with_values:
            return probs, [collector.values[layer] for layer in sorted(collector.values)]
        return probs
