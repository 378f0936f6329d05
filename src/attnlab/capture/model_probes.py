"""The model runner of model-level probes: whole forward/backward passes with standard PyTorch hooks.

:class:`ModelRunner` gives a :class:`attnlab.probes.model_base.ModelProbe` what one attention call cannot:

- ``forward(batch, ...)`` runs the model once and returns a :class:`ForwardRecord`: logits, each transformer
  block's output (the residual stream after block l), optionally every head's output before the output projection
  (a forward pre-hook on the block's ``o_proj``; METHODS.md notation o^{l,h}), the per-token next-token loss and,
  with ``gradients=True``, one backward pass of the mean loss giving ‖∂L/∂h_l‖ and the parameter-gradient norm of
  every block.
- head interventions in the same pass: ``head_scale`` multiplies a head's output (0 = ablation) and ``first_key``
  replaces a head's output by the value of the first real key, which is exactly the output of one-hot attention on
  that key (Guo et al. 2024, "MoveAttentionToBOS", METHODS.md #3). Both act on the o_proj input, per query head
  (GQA: the value of the head's kv group).
- ``attention_probs(batch)`` returns full probs per layer (a :class:`attnlab.Session` with a collecting probe;
  short sequences only: memory ∝ num_heads · seq_len²).
- ``encode(id_lists)`` builds a right-padded batch from token id lists, adding the tokenizer's special tokens.

Hooks are registered for one call and removed in ``finally``; the model's weights and settings are not changed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.capture.architectures import attention_sizes, text_config, transformer_blocks
from attnlab.errors import ConfigError, UnsupportedModelError
from attnlab.functional.attention import BlockView
from attnlab.probes.base import AttentionCall, Probe
from attnlab.probes.model_base import ModelInfo

# (output-projection path, value-projection path) inside a transformer block, by family.
PROJECTION_PATHS = (
    ("self_attn.o_proj", "self_attn.v_proj"),  # Llama, Mistral, Qwen, Gemma, OLMo, Phi-3 (o_proj)
    ("attention.output.dense", "attention.self.value"),  # BERT, RoBERTa
    ("self_attn.out_proj", "self_attn.v_proj"),  # OPT
    ("attention.dense", None),  # GPT-NeoX (fused qkv)
)


def _get(root: Any, path: str | None) -> Any:
    if path is None:
        return None
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


@dataclass
class ForwardRecord:
    """What one :meth:`ModelRunner.forward` call observed.

    Attributes:
        logits: (batch, seq_len, vocab) float32, or None for models without an LM head.
        last_hidden: (batch, seq_len, hidden_size), the model's final hidden states (after the final norm).
        layer_outputs: per block, (batch, seq_len, hidden_size) residual stream after block l (detached).
        head_outputs: per block, (batch, seq_len, num_heads, head_dim) head outputs before W_O, or None.
        token_loss: (batch, seq_len - 1) next-token cross-entropy (nats), 0 where ``target_valid`` is False; None
            for models without logits.
        target_valid: (batch, seq_len - 1) bool, True where both the token and the next one are real.
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
        """(batch,) mean next-token loss over each sequence's real targets (NaN without targets)."""
        if self.token_loss is None:
            raise ConfigError("the model has no LM head, so there is no next-token loss")
        count = self.target_valid.sum(-1).double()
        return (self.token_loss.double() * self.target_valid).sum(-1) / count


class _ProbsCollector(Probe):
    """Collects full probs (B, H, Lq, Lk) per layer; rows of padding queries are 0."""

    name = "_probs"
    needs = frozenset({"probs"})

    def __init__(self) -> None:
        self.probs: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def begin_call(self, call: AttentionCall) -> None:
        B = call.query_valid.shape[0]
        self.probs[call.layer_idx] = torch.zeros(B, call.num_heads, call.q_len, call.kv_len)
        self.values[call.layer_idx] = call.value.float().cpu()  # (B, Hkv, Lk, Dv)

    def update(self, call: AttentionCall, block: BlockView) -> None:
        width = block.probs.shape[-1]
        real = call.query_valid[:, block.q_index][:, None, :, None]
        self.probs[call.layer_idx][:, :, block.q_index, :width] = (block.probs * real).float().cpu()


def next_token_loss(logits: Tensor, input_ids: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy of predicting token t+1 at t; returns (loss (B, L-1), target_valid (B, L-1))."""
    target_valid = valid[:, :-1] & valid[:, 1:]
    loss = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return loss * target_valid, target_valid


class ModelRunner:
    """Runs a transformers model for model-level probes (see the module docstring).

    Args:
        model: a transformers model (causal LM or encoder) in eval mode.
        tokenizer: its tokenizer, or None (then ``encode`` needs ids that already carry special tokens).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.other: ModelRunner | None = None  # a second model (set by the probe suite for --compare)
        # BOS policy for text the probes load themselves (text B); the probe suite sets the run's resolved one
        self.bos_policy = "auto"
        self.blocks = transformer_blocks(model)
        if self.blocks is None:
            raise UnsupportedModelError(f"cannot find the transformer blocks of {type(model).__name__}")
        num_layers, num_heads, num_kv_heads = attention_sizes(model)
        config = text_config(model)
        hidden = int(config.hidden_size)
        head_dim = int(getattr(config, "head_dim", None) or hidden // num_heads)
        rope = getattr(config, "rope_theta", None)
        if rope is None:
            params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
            rope = params.get("rope_theta") if isinstance(params, dict) else None
        causal = bool(getattr(config, "is_decoder", False) or hasattr(model, "lm_head")
                      or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")))
        bos = None
        if tokenizer is not None:
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        self._vocab: list[str] | None = None
        self.info = ModelInfo(num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, hidden_size=hidden, causal=causal,
                              rope_theta=float(rope) if rope is not None else None, bos_token_id=bos,
                              decode=self.decode, vocab_strings=self.vocab_strings)
        self.projections = [self._projections(block) for block in self.blocks]

    # tokenizer helpers --------------------------------------------------------------------------------------
    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)]) if self.tokenizer is not None else str(token_id)

    def vocab_strings(self) -> list[str]:
        """Every token's decoded string, index = id (cached)."""
        if self._vocab is None:
            size = len(self.tokenizer) if self.tokenizer is not None else 0
            self._vocab = self.tokenizer.batch_decode([[i] for i in range(size)]) if size else []
        return self._vocab

    def encode(self, id_lists: Sequence[Sequence[int]], *, device: Any = None) -> dict[str, Tensor]:
        """Right-padded batch (``input_ids``, ``attention_mask``) from token ids, with the tokenizer's specials."""
        tok = self.tokenizer
        if tok is not None and hasattr(tok, "build_inputs_with_special_tokens"):
            id_lists = [tok.build_inputs_with_special_tokens(list(ids)) for ids in id_lists]
        pad = (tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0)
        length = max(len(ids) for ids in id_lists)
        input_ids = torch.full((len(id_lists), length), pad, dtype=torch.long)
        mask = torch.zeros(len(id_lists), length, dtype=torch.long)
        for i, ids in enumerate(id_lists):
            input_ids[i, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            mask[i, : len(ids)] = 1
        device = device or next(self.model.parameters()).device
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}

    # hooks --------------------------------------------------------------------------------------------------
    def _projections(self, block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        for out_path, value_path in PROJECTION_PATHS:
            out = _get(block, out_path)
            if isinstance(out, nn.Linear):
                return out, _get(block, value_path)
        return None, None

    def _require_projection(self, layer: int, value: bool = False) -> tuple[nn.Module, nn.Module | None]:
        out, val = self.projections[layer]
        if out is None or (value and val is None):
            raise UnsupportedModelError(
                f"cannot find the attention {'value' if value else 'output'} projection of block {layer} in "
                f"{type(self.model).__name__}; head-level probes support Llama-, BERT- and OPT-style blocks")
        return out, val

    @contextmanager
    def _hooks(self, record: dict[str, Any], *, head_outputs: bool, gradients: bool,
               head_scale: dict[int, Tensor] | None, first_key: dict[int, Tensor] | None,
               first_index: Tensor | None) -> Iterator[None]:
        handles = []
        H = self.info.num_heads
        try:
            for layer, block in enumerate(self.blocks):
                def block_hook(module: nn.Module, args: Any, output: Any, layer: int = layer) -> None:
                    hidden = output[0] if isinstance(output, (tuple, list)) else output
                    if gradients and hidden.requires_grad:
                        hidden.retain_grad()
                    record["layers"][layer] = hidden
                handles.append(block.register_forward_hook(block_hook))
                scale = (head_scale or {}).get(layer)
                replace = (first_key or {}).get(layer)
                if not (head_outputs or scale is not None or replace is not None):
                    continue
                out, val = self._require_projection(layer, value=replace is not None)
                if replace is not None:
                    def value_hook(module: nn.Module, args: Any, output: Tensor, layer: int = layer) -> None:
                        record["values"][layer] = output
                    handles.append(val.register_forward_hook(value_hook))

                def out_hook(module: nn.Module, args: tuple, layer: int = layer, scale: Tensor | None = scale,
                             replace: Tensor | None = replace) -> tuple | None:
                    x = args[0]
                    B, L, width = x.shape
                    heads = x.view(B, L, H, width // H)
                    if replace is not None:
                        value = record["values"][layer]
                        Hkv = self.info.num_kv_heads
                        value = value.view(B, L, Hkv, -1)
                        first = value[torch.arange(B, device=x.device), first_index.to(x.device)]  # (B, Hkv, Dv)
                        first = first.repeat_interleave(H // Hkv, dim=1)[:, None]  # (B, 1, H, Dv)
                        chosen = replace.to(x.device).view(-1, 1, H, 1)  # (1|B, 1, H, 1)
                        heads = torch.where(chosen, first.expand_as(heads), heads)
                    if scale is not None:
                        heads = heads * scale.to(x.device, x.dtype).view(-1, 1, H, 1)
                    if head_outputs:
                        record["heads"][layer] = heads.detach()
                    if replace is None and scale is None:
                        return None
                    return (heads.reshape(B, L, width), *args[1:])
                handles.append(out.register_forward_pre_hook(out_hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    # passes -------------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor], *, head_outputs: bool = False, gradients: bool = False,
                head_scale: dict[int, Tensor] | None = None, first_key: dict[int, Tensor] | None = None
                ) -> ForwardRecord:
        """One forward pass (and one backward pass of the mean next-token loss with ``gradients=True``).

        Args:
            batch: ``input_ids`` (batch, seq_len) and optionally ``attention_mask`` (batch, seq_len), 1 = real.
            head_outputs: record every head's output before W_O.
            gradients: backpropagate the mean next-token loss over all real targets of the batch.
            head_scale: {layer: (num_heads,) or (batch, num_heads) multipliers of the head outputs}.
            first_key: {layer: (num_heads,) or (batch, num_heads) bool}: these heads attend one-hot to the first
                real key (per sequence with a 2-D selection, so one pass can ablate a different head per row).
        Raises:
            UnsupportedModelError: a head-level option on a block whose projections are not found.
            ConfigError: ``gradients=True`` for a model without an LM head.
        """
        input_ids = batch["input_ids"]
        valid = batch.get("attention_mask", torch.ones_like(input_ids)).bool()
        first_index = valid.long().argmax(dim=-1)  # (B,) index of the first real token
        record: dict[str, Any] = {"layers": {}, "heads": {}, "values": {}}
        kwargs = {"input_ids": input_ids, "attention_mask": valid.long()}
        with self._hooks(record, head_outputs=head_outputs, gradients=gradients, head_scale=head_scale,
                         first_key=first_key, first_index=first_index):
            with torch.set_grad_enabled(gradients):
                output = self.model(**kwargs, output_hidden_states=True)
        logits = getattr(output, "logits", None)
        hidden = output.hidden_states[-1] if getattr(output, "hidden_states", None) is not None \
            else output.last_hidden_state
        token_loss, target_valid = None, valid[:, :-1] & valid[:, 1:]
        if logits is not None:
            token_loss, target_valid = next_token_loss(logits, input_ids, valid)
        act_norm = param_norm = None
        if gradients:
            if token_loss is None:
                raise ConfigError("gradient probes need a model with an LM head (a causal LM)")
            loss = token_loss.sum() / target_valid.sum().clamp(min=1)
            params = [p for p in self.model.parameters() if p.requires_grad]
            layers = [record["layers"][i] for i in range(self.info.num_layers)]
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
        outputs = [record["layers"][i].detach() for i in range(self.info.num_layers)]
        heads = [record["heads"][i] for i in range(self.info.num_layers)] if head_outputs else None
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
        probs = [collector.probs[layer] for layer in sorted(collector.probs)]
        if with_values:
            return probs, [collector.values[layer] for layer in sorted(collector.values)]
        return probs
