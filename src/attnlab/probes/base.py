"""The probe contract: what a probe sees, what it keeps, what it returns.

A probe observes attention while a model runs inside a :class:`attnlab.Session`. It declares what it needs
(``"probs"`` makes the session run the blocked eager kernel; ``"value"`` and ``"hidden_states"`` are available on
the fast path too), keeps its state as small float64 tensors indexed ``(layer, head, ...)`` that merge by addition
(so windows, batches and ranks combine), and returns long-format rows
``{probe, statistic, layer, head, position, value}`` (see docs/results.md) plus optional extras.

Needs: ``"probs"`` (the blocked kernel feeds ``update`` with each query block's probs and logits), ``"value"``
(``begin_call``/``end_call`` with the call record on every path), ``"hidden_states"`` (``on_hidden_states`` per
decoder layer) and ``"every_row"`` (with ``"probs"``: every query row, never a ``query_fraction`` sample).

Call order per attention call of one layer: ``begin_call(call)``, ``update(call, block)`` for every query block,
``end_call(call)``. Per decoder layer: ``on_hidden_states(layer_idx, hidden_states, sequence)``.

The fused protocol (optional, for ``"probs"`` probes whose statistics are reductions the fused kernel
:func:`attnlab.functional.fused_attention.fused_attention` computes in the pass that makes the output): a probe
returns a :class:`~attnlab.functional.fused_attention.FusedRequest` from ``fused_request(call)`` and takes the
call's :class:`~attnlab.functional.fused_attention.FusedStats` in ``update_fused(call, stats)``, which then
replaces every ``update`` of that call. A call runs the fused kernel only when every probe that reads probs
returns a request (the default ``fused_request`` returns None: the blocked kernel feeds ``update``); the session
records the kernel that ran in ``attention_paths`` (``"fused"`` or ``"blocked_eager"``).

The call record :class:`AttentionCall` is the one record probes **and** edits receive
(``attnlab.edits.base`` re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from attnlab.facts import ModelFacts
from attnlab.functional.attention import BlockView
from attnlab.report.sections import Section
from attnlab.roles import ImageSpan, TokenRoles

if TYPE_CHECKING:
    from attnlab.functional.fused_attention import FusedRequest, FusedStats

Row = dict[str, Any]


@dataclass(frozen=True, eq=False)
class SequenceInfo:
    """Which tokens of the current forward pass are real (not padding), and where each sits.

    Attributes:
        valid: (B, L) bool, True for real tokens (from the model's 2-D ``attention_mask``; all True without one).
        positions: (B, L) long, 0 for each sequence's first real token, counting real tokens only (-1 on padding).
        input_ids: (B, L) long or None.
        sequence_offset: global index of this batch's first sequence among all sequences the session has seen.
        roles: the :class:`attnlab.roles.TokenRoles` of the L columns (image / text / system / generated / pad and
            the image grids) on a vision-language model, else None.
    """

    valid: Tensor
    positions: Tensor
    input_ids: Tensor | None
    sequence_offset: int
    roles: TokenRoles | None = None

    @classmethod
    def from_mask(cls, valid: Tensor, input_ids: Tensor | None, sequence_offset: int,
                  roles: TokenRoles | None = None) -> SequenceInfo:
        valid = valid.bool()
        positions = torch.where(valid, valid.long().cumsum(-1) - 1, torch.full_like(valid, -1, dtype=torch.long))
        return cls(valid=valid, positions=positions, input_ids=input_ids, sequence_offset=sequence_offset,
                   roles=roles)


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """One attention call of one layer: what probes observe and edits act on.

    Attributes:
        layer_idx: index of the attention layer.
        num_heads, num_kv_heads: Hq and Hkv; query head h reads kv head ``h // (Hq // Hkv)``
            (``num_kv_groups`` = Hq // Hkv).
        q_len, kv_len: Lq and Lk of this call (the queries are the last Lq of the Lk keys' tokens).
        causal: whether the layer is causal (distances are ``q - k``) or bidirectional (``|q - k|``).
        scale: the logit scale the model uses (``head_dim ** -0.5`` unless the model says otherwise).
        value: (B, Hkv, Lk, Dv) value states as the model passed them (detached).
        query_valid: (B, Lq) bool, real query tokens. key_valid: (B, Lk) bool, real key tokens.
        query_positions: (B, Lq) long and key_positions: (B, Lk) long: token positions counting real tokens only
            (0 = the sequence's first real token; -1 on padding).
        sequence: the SequenceInfo of the forward pass.
        query_roles: (B, Lq) int8 and key_roles: (B, Lk) int8: role codes (:data:`attnlab.roles.ROLES`) of the
            query and key tokens on a vision-language model, else None.
        hidden_states: (B, Lq, hidden) the decoder layer's input residual stream at the query tokens (detached),
            only when an edit on the layer sets ``needs_hidden_states`` (VAR's sink detection) or a probe needs
            ``"hidden_states"``; else None.
        step: the denoising step (0-based) of the forward pass: set by a
            :class:`attnlab.diffusion.DiffusionSession`, or by ``Session.set_step`` (diffusion LMs); else None.
        kind: on a diffusion transformer, ``"self"`` (patch tokens attend to patch tokens), ``"cross"`` (patch
            queries, text keys) or ``"joint"`` (one sequence of text and patch tokens, as SD3 and Flux); else None.
            There patch tokens have role ``image`` and text (conditioning) tokens role ``text``.
        grid: (frames, rows, cols) of a diffusion call's patch tokens (frames = 1 for images), which appear in
            raster order (frame, then row, then column) wherever they sit in the query/key sequence; else None.
        block: on a diffusion transformer, the index of the transformer block that holds the attention module
            (``DiffusionSession.layer_table()``); else None.
    """

    layer_idx: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    causal: bool
    scale: float
    value: Tensor
    query_valid: Tensor
    key_valid: Tensor
    query_positions: Tensor
    key_positions: Tensor
    sequence: SequenceInfo
    query_roles: Tensor | None = None
    key_roles: Tensor | None = None
    hidden_states: Tensor | None = None
    step: int | None = None
    kind: str | None = None
    grid: tuple[int, int, int] | None = None
    block: int | None = None

    @property
    def images(self) -> tuple[ImageSpan, ...]:
        """Every image span of the forward pass (columns of ``sequence``; empty without roles)."""
        roles = self.sequence.roles
        return () if roles is None else roles.images

    @property
    def num_kv_groups(self) -> int:
        """Query heads per kv head (``num_heads // num_kv_heads``)."""
        return self.num_heads // self.num_kv_heads

    @property
    def batch(self) -> int:
        return self.query_positions.shape[0]

    @property
    def device(self) -> torch.device:
        return self.query_positions.device


def visible(call: AttentionCall, block: BlockView) -> Tensor:
    """(B, H, bq, Lk) bool: real query rows of the block and the keys each of them could attend to."""
    B, H, bq, Lk = block.probs.shape
    query_ok = call.query_valid[:, block.q_index][:, None, :, None]  # (B, 1, bq, 1)
    sees = query_ok if block.keep is None else (block.keep & query_ok)
    return sees.expand(B, H, bq, Lk)


def key_index_of_positions(key_positions: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Where the keys at real-token positions 0 … count-1 sit in each sequence.

    Args:
        key_positions: (B, Lk) long, -1 on padding.
    Returns:
        index (B, count) long (0 where absent) and present (B, count) bool.
    """
    ranks = torch.arange(count, device=key_positions.device)
    match = key_positions[:, None, :] == ranks[None, :, None]  # (B, count, Lk)
    return match.long().argmax(dim=-1), match.any(dim=-1)


class Measurement:
    """What probes and analyses share: a registered ``name``, the report ``sections`` they draw, an additive
    ``state()`` that merges across windows, batches and ranks, long-format ``rows()`` and JSON ``extras()``.

    Export and import (runs over several processes, ``--resume``; :mod:`attnlab.shards`): :meth:`export_state`
    gives the *whole* state as ``(tensors, side)``, tensors (safetensors) plus JSON-serialisable side parts (hit
    lists, per-window records), and :meth:`import_state` puts such a pair back into an instance of the same type
    and config that is already bound (probes) or prepared (analyses). The default exports ``state()``, whose keys
    must then be the names of the attributes holding those tensors, and no side parts; a subclass with more state
    (lists, dicts, counters) extends both methods. ``import_state`` replaces every state attribute by new objects
    (never mutates the old ones in place); the pipeline imports into deep copies of a live instance
    (:func:`attnlab.shards.fresh_copy`), so merges never share containers with it.
    ``merge`` must then give the same result whatever the grouping of the states merged in window order
    (``(a + b) + c`` equals ``a + (b + c)`` up to float summation order). Set ``shardable = True`` only on a
    class whose export captures its whole state; otherwise (the default) a run over several processes refuses it,
    and a one-process run makes one plain pass over every window (no per-shard reset, export or merge, no shard
    files).
    """

    sections: ClassVar[tuple[Section, ...]] = ()
    """The report sections drawn from the rows (:mod:`attnlab.report.sections`); () = rows only in the tables."""
    name: ClassVar[str] = ""
    shardable: ClassVar[bool] = False
    """True when :meth:`export_state`/:meth:`import_state` capture the whole state and ``merge`` combines it.
    False by default (a plug-in opts in; every built-in probe and analysis sets True): such an object is refused
    under several processes and with ``--resume``, and a one-process run makes one plain pass (no shards)."""

    hit_lists: ClassVar[tuple[str, ...]] = ()
    """Names of list attributes holding tuples (e.g. ``"hits"``: one tuple per sink/magnet found) that belong to the
    state: :meth:`merge` appends the other's, :meth:`export_state` carries them as JSON lists."""

    def state(self) -> dict[str, Tensor]:
        """The additive state: tensors that can be summed across windows, batches and ranks."""
        return {}

    def merge(self, other: Measurement) -> None:
        """Add another instance's state (same type, same config) into this one, and append its :attr:`hit_lists`;
        ValueError on different keys."""
        add_states(self.name, self.state(), other.state())
        for name in self.hit_lists:
            getattr(self, name).extend(getattr(other, name))

    def export_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The whole state: ``(tensors, side)``, CPU tensors (``state()`` by default) and JSON side parts (the
        :attr:`hit_lists` by default)."""
        tensors = {key: tensor.detach().cpu() for key, tensor in self.state().items()}
        return tensors, {name: [list(hit) for hit in getattr(self, name)] for name in self.hit_lists}

    def import_state(self, tensors: dict[str, Tensor], side: dict[str, Any]) -> None:
        """Replace this instance's state by an exported one (``tensors`` keyed like ``state()``: attribute names).

        Raises:
            ValueError: the keys differ from this instance's ``state()`` keys (another probe or version).
        """
        expected = set(self.state())
        if set(tensors) != expected:
            raise ValueError(f"cannot import a {self.name} state with keys {sorted(tensors)}; expected "
                             f"{sorted(expected)}")
        for key, tensor in tensors.items():
            setattr(self, key, tensor.clone())
        for name in self.hit_lists:
            setattr(self, name, [tuple(hit) for hit in side[name]])

    def rows(self) -> list[Row]:
        """Long-format rows for results.csv (docs/results.md)."""
        return []

    def extras(self, decode: Any = None) -> dict[str, Any]:
        """JSON-serialisable extras (bin edges, token tables). ``decode(token_id) -> str`` when a tokenizer is known."""
        return {}


class Probe(Measurement):
    """Base class of every probe. Subclasses set ``needs`` and override the hooks they use; ``@PROBES.register``
    names them."""

    needs: ClassVar[frozenset[str]] = frozenset()
    counts_nan_rows: ClassVar[bool] = False  # True: update() also sees query rows whose probs became NaN
    needs_runner: ClassVar[bool] = False  # True if prepare() reads the tokenizer through a ModelRunner (magnets)

    def bind(self, facts: ModelFacts) -> None:
        """Called once by the session before the first forward pass with the model's sizes.

        State indexed by position or distance starts small and grows (``pad_to_length``) as longer sequences
        arrive."""
        self.facts = facts

    def prepare(self, facts: ModelFacts, runner: Any) -> None:  # noqa: B027 - optional hook
        """Called by :func:`attnlab.pipeline.run_probes` before the Session, with a
        :class:`attnlab.capture.runner.ModelRunner` when ``needs_runner`` (else None): what only the tokenizer
        knows (token strings, the BOS id). Model sizes and settings arrive in :meth:`bind`."""

    def begin_call(self, call: AttentionCall) -> None:  # noqa: B027 - optional hook
        pass

    def update(self, call: AttentionCall, block: BlockView) -> None:  # noqa: B027 - optional hook
        pass

    def end_call(self, call: AttentionCall) -> None:  # noqa: B027 - optional hook
        pass

    def on_hidden_states(self, layer_idx: int, hidden_states: Tensor, sequence: SequenceInfo) -> None:  # noqa: B027
        pass

    def fused_request(self, call: AttentionCall) -> FusedRequest | None:
        """What the fused kernel should compute for this probe on ``call``, or None (the default) to have the
        blocked kernel feed :meth:`update` instead. Called once per call, after ``begin_call``; a probe may decline
        some calls (``distance`` declines bidirectional ones). Only asked of probes that need ``"probs"``; a probe
        that returns a request must implement :meth:`update_fused`."""
        return None

    def update_fused(self, call: AttentionCall, stats: FusedStats) -> None:
        """Take the whole call's :class:`~attnlab.functional.fused_attention.FusedStats` (what the merged requests
        of the call's probes asked for; shapes in its docstring) in place of every :meth:`update` of the call,
        leaving the same state. Called between ``begin_call`` and ``end_call``, without gradient.

        Raises:
            NotImplementedError: on a probe whose :meth:`fused_request` returned a request but that does not
                override this method.
        """
        raise NotImplementedError(f"probe {self.name or type(self).__name__} returned a fused_request but does not "
                                  "implement update_fused")



@dataclass
class RowWriter:
    """Collects rows with the fixed column order; converts tensors to Python floats and NaN-free values."""

    probe: str
    rows: list[Row] = field(default_factory=list)

    def add(self, statistic: str, value: float, layer: int | None = None, head: int | None = None,
            position: int | None = None) -> None:
        self.rows.append({"probe": self.probe, "statistic": statistic, "layer": layer, "head": head,
                          "position": position, "value": float(value)})

    def add_grid(self, statistic: str, grid: Tensor, *, position: int | None = None, valid: Tensor | None = None) -> None:
        """Add a (num_layers, num_heads) grid; entries where ``valid`` is False are skipped."""
        valid = torch.ones_like(grid, dtype=torch.bool) if valid is None else valid
        self.add_indexed(statistic, grid, valid, ("layer", "head"), position=position)

    def add_indexed(self, statistic: str, values: Tensor, valid: Tensor, columns: tuple[str, ...],
                    **fixed: int | None) -> None:
        """One row per True entry of ``valid``; the entry's indices fill ``columns`` (e.g. ``("layer", "position")``).

        Vectorised (one ``tolist`` per call), so position-level tables stay fast at long sequence lengths.
        """
        indices = valid.nonzero().tolist()
        picked = values[valid].tolist()
        for index, value in zip(indices, picked):
            row: Row = {"probe": self.probe, "statistic": statistic, "layer": None, "head": None, "position": None}
            row.update(fixed)
            row.update(zip(columns, index))
            row["value"] = float(value)
            self.rows.append(row)


def add_states(name: str, mine: dict[str, Tensor], theirs: dict[str, Tensor]) -> None:
    """Add the additive state ``theirs`` into ``mine`` in place (``Probe.merge`` and ``Analysis.merge``).

    Args:
        name: the owner's registered name, for the error message.
        mine: the owner's ``state()``: its own tensors, which are updated in place.
        theirs: another instance's ``state()`` with the same keys and broadcastable shapes.

    Raises:
        ValueError: if the two states have different keys.
    """
    if mine.keys() != theirs.keys():
        raise ValueError(f"cannot merge {name} states with keys {sorted(mine)} and {sorted(theirs)}")
    for key, tensor in mine.items():
        tensor += theirs[key]


def safe_div(numerator: Tensor, denominator: Tensor) -> Tensor:
    """Elementwise numerator / denominator, NaN where the denominator is 0 (callers skip NaN rows)."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), torch.full_like(numerator, float("nan")))


def pad_to_length(tensors: tuple[Tensor, ...], length: int) -> tuple[Tensor, ...]:
    """Zero-pad the last dim of each tensor up to ``length`` (tensors already that long are returned as is).

    Probes whose state is indexed by position or distance grow it when a longer sequence arrives.
    """
    return tuple(torch.nn.functional.pad(t, (0, length - t.shape[-1])) if t.shape[-1] < length else t
                 for t in tensors)

