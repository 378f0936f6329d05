"""Shared parts of the vision-language edits (``var``, ``dual_stream``, ``gift``): token roles as per-column masks of
one attention call, and per-layer state measured on the call that holds the prompt, reused by the decode calls.

Columns: key column k of a call is column k of the forward's 2-D attention mask (past + new tokens); query row r is
column ``kv_len - q_len + r``. Roles come from ``call.key_roles`` / ``call.query_roles`` (:mod:`attnlab.roles`); a
call without roles (a text-only model) has no image keys, and these edits then change nothing.

Teacher forcing vs cached generation: the session marks the tokens a decoding step appends as role ``generated``,
but tokens fed in one forward pass (an answer teacher-forced after the prompt, as
:func:`attnlab.protocols.vhr.generation_t_vhd` and ``--answer`` do) are read from the ids, so they are ``text``. A
teacher-forced answer therefore counts as part of the instruction: :func:`instruction_keys` /
:func:`instruction_rows` include it, :func:`answer_rows` keeps only its last column (the last non-generated one),
and the state a decode call would reuse from the prompt call (:class:`PrefillStore`, var's sink dimensions) is
measured over prompt + answer instead. So ``var`` (sink dimensions and flags), ``dual_stream`` (its selection from
the instruction rows; the rows it modulates) and ``gift`` (the saliency from the instruction's gaze) give different
results on a teacher-forced answer than on the same answer from cached ``generate``: about 1e-3 in the probs on
the tiny test models. ``cca`` and ``vhr`` read no text roles and agree. :func:`attnlab.roles.given_roles` with the
answer's columns marked ``generated`` makes the roles agree, but not the prompt-call state; measure role-based
edits on generation with ``generate``.

Shapes: B batch, Hq query heads, Lq query rows, Lk key columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnlab.edits.base import AttentionCall
from attnlab.errors import ConfigError
from attnlab.roles import GENERATED, IMAGE, TEXT, after_last_image
from attnlab.roles import last_image_column as last_image_of


def query_columns(call: AttentionCall) -> Tensor:
    """(Lq,) long: the key column of each query row."""
    return torch.arange(call.kv_len - call.q_len, call.kv_len, device=call.device)


def key_roles(call: AttentionCall) -> Tensor | None:
    """(B, Lk) int8 role codes of the keys, or None without roles."""
    return None if call.key_roles is None else call.key_roles.to(call.device)


def image_keys(call: AttentionCall) -> Tensor:
    """(B, Lk) bool: real image-token keys (all False without roles)."""
    roles = key_roles(call)
    if roles is None:
        return torch.zeros(call.batch, call.kv_len, dtype=torch.bool, device=call.device)
    return (roles == IMAGE) & call.key_valid


def last_image_column(call: AttentionCall) -> Tensor:
    """(B,) long: each sequence's last image-token column (-1 where the sequence has no image)."""
    return last_image_of(image_keys(call))


def after_image_rows(call: AttentionCall) -> Tensor:
    """(B, Lq) bool: real query rows after their sequence's last image token (False in a sequence with no image)."""
    return after_last_image(image_keys(call), call.key_valid)[:, call.kv_len - call.q_len:] & call.query_valid


def instruction_keys(call: AttentionCall) -> Tensor:
    """(B, Lk) bool: the user's instruction: real text keys after the sequence's last image (not generated)."""
    roles = key_roles(call)
    if roles is None:
        return torch.zeros(call.batch, call.kv_len, dtype=torch.bool, device=call.device)
    return (roles == TEXT) & after_last_image(image_keys(call), call.key_valid)


def instruction_rows(call: AttentionCall) -> Tensor:
    """(B, Lq) bool: query rows that are instruction tokens (see :func:`instruction_keys`)."""
    return instruction_keys(call)[:, call.kv_len - call.q_len:]


def answer_rows(call: AttentionCall) -> Tensor:
    """(B, Lq) bool: the rows that predict the answer: each sequence's last prompt token (the last real column whose
    role is not "generated") and every generated token, in sequences that hold an image."""
    roles = key_roles(call)
    if roles is None:
        return torch.zeros(call.batch, call.q_len, dtype=torch.bool, device=call.device)
    columns = torch.arange(call.kv_len, device=call.device).expand(call.batch, -1)
    prompt = call.key_valid & (roles != GENERATED)
    last_prompt = torch.where(prompt, columns, -1).amax(dim=-1)  # (B,)
    rows = query_columns(call)[None, :]
    query_roles = roles[:, call.kv_len - call.q_len:]
    answer = (rows == last_prompt[:, None]) | (query_roles == GENERATED)
    has_image = last_image_column(call) >= 0
    return answer & call.query_valid & has_image[:, None]


def pad_columns(table: Tensor, kv_len: int, fill: float | bool = 0) -> Tensor:
    """``table`` (B, L0, ...) → (B, kv_len, ...) with ``fill`` in the new columns (decode steps add keys)."""
    extra = kv_len - table.shape[1]
    if extra <= 0:
        return table[:, :kv_len]
    pad = torch.full((table.shape[0], extra, *table.shape[2:]), fill, dtype=table.dtype, device=table.device)
    return torch.cat([table, pad], dim=1)


class PrefillStore:
    """Per-layer tensors measured on the call that holds the prompt, for the decode calls of the same layer.

    ``put(call, tensors)`` keeps (B, Lk, ...) or (B, ...) tensors for ``call.layer_idx``; ``get(call)`` returns them
    for a later call of that layer, key-column tables padded to its kv_len with ``fill`` values.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.tables: dict[int, dict[str, Tensor]] = {}

    def clear(self) -> None:
        self.tables = {}

    def put(self, call: AttentionCall, **tensors: Tensor) -> None:
        self.tables[call.layer_idx] = tensors

    def get(self, call: AttentionCall, columns: tuple[str, ...], fill: dict[str, float | bool]) -> dict[str, Tensor]:
        """The layer's tensors, those named in ``columns`` padded to ``call.kv_len``.

        Raises:
            ConfigError: no prompt call of this layer ran in the session, or its batch size differs.
        """
        stored = self.tables.get(call.layer_idx)
        if stored is None:
            raise ConfigError(f"edit {self.owner!r}: layer {call.layer_idx}'s call (q_len {call.q_len}, kv_len "
                              f"{call.kv_len}) holds no instruction tokens and no prompt call of this layer ran "
                              "in the session before it; run the prompt inside the session")
        batch = next(iter(stored.values())).shape[0]
        if batch != call.batch:
            raise ConfigError(f"edit {self.owner!r}: layer {call.layer_idx}'s call has batch {call.batch}, its "
                              f"prompt call had batch {batch}")
        return {name: pad_columns(t, call.kv_len, fill.get(name, 0)) if name in columns else t
                for name, t in stored.items()}
