"""Token roles: which tokens of a sequence are image, text, system prompt, generated or padding.

A vision-language model's decoder reads one sequence in which some positions hold image tokens (the vision
tower's patch features after the projector) and the rest text. Probes split their statistics by role (attention
mass from text queries to image keys), edits select queries and keys by role (``keys=image``), and the image
methods (VAR, CCA, CARVE, …) need each image's grid: which token is row r, column c of which image.

The session derives a :class:`TokenRoles` per forward pass from ``input_ids`` (the model's image token id marks
image positions, as every transformers VLM processor writes them) and, for Qwen2-VL-style models, the
``image_grid_thw`` the processor returns. An input builder that knows more (a system prompt's span) passes its
roles explicitly with :func:`given_roles`.

Shapes: B batch, L token columns of the forward's 2-D attention mask (past + new tokens).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from attnlab.errors import ConfigError, ShapeError

ROLES: tuple[str, ...] = ("pad", "text", "image", "system", "generated")
RoleName = Literal["text", "image", "system", "generated"]
RoleList = tuple[RoleName, ...]  # an edit's ``queries=`` / ``keys=``: text joins names with "+" ("image+text")

PAD, TEXT, IMAGE, SYSTEM, GENERATED = range(len(ROLES))


def role_codes(names: str | Sequence[str]) -> tuple[int, ...]:
    """Role names (``"image"``, ``"image+text"``, ``("image", "text")``) → their codes (indices into ROLES).

    Raises ConfigError on an unknown name or an empty selection."""
    items = [part.strip() for part in names.split("+")] if isinstance(names, str) else list(names)
    unknown = [name for name in items if name not in ROLES]
    if unknown or not items:
        raise ConfigError(f"roles must be among {', '.join(ROLES[1:])} (joined with '+'), got {names!r}")
    return tuple(ROLES.index(name) for name in items)


TOKEN_ID_KEYS = ("image_token_id", "image_token_index", "video_token_id")  # where VLM configs name their image ids


def config_image_token_ids(config: Any) -> tuple[int, ...]:
    """The ids a VLM config names for image/video tokens (``image_token_id`` / ``image_token_index`` /
    ``video_token_id``, each once, in that order); () when it names none."""
    ids: list[int] = []
    for key in TOKEN_ID_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0 and value not in ids:
            ids.append(value)
    return tuple(ids)


def codes_in(codes: Tensor, selected: Sequence[int]) -> Tensor:
    """(…) bool: where ``codes`` (int8 role codes) is one of ``selected``."""
    return torch.isin(codes, torch.tensor(list(selected), dtype=codes.dtype, device=codes.device))


@dataclass(frozen=True)
class ImageSpan:
    """One image (or one tile of a split image, or one video) inside one sequence.

    Attributes:
        sequence: the batch row. start: its first token column (a column of the forward's 2-D attention mask, so
            under a cropped KV cache key index = column - (columns - kv_len)). rows, cols, frames: its token grid
            (raster order, frame after frame). index: the image's number within its sequence (0, 1, …).
        grid_known: False when the layout could not be read (a run of image tokens that is not a square, with no
            grid from the processor, e.g. LLaVA-NeXT's newline tokens); then rows = 1 and cols = its length, and
            methods that need the 2-D grid (CCA, overlays) refuse it or treat it as a strip.
    """

    sequence: int
    start: int
    rows: int
    cols: int
    frames: int = 1
    index: int = 0
    grid_known: bool = True

    @property
    def length(self) -> int:
        """Tokens in the span (rows · cols · frames)."""
        return self.rows * self.cols * self.frames

    @property
    def end(self) -> int:
        """The column after the span's last token."""
        return self.start + self.length

    def shifted(self, offset: int) -> ImageSpan:
        """The same span ``offset`` columns later (roles of a chunk appended after ``offset`` cached tokens)."""
        return dataclasses.replace(self, start=self.start + offset)

    def grid_of(self, column: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(frame, row, col) long tensors of token columns inside the span (raster order within each frame).

        Raises ShapeError if a column lies outside the span."""
        offset = column.long() - self.start
        if bool(((offset < 0) | (offset >= self.length)).any()):
            raise ShapeError(f"columns must lie in the image span [{self.start}, {self.end}), got "
                             f"{column.min().item()}…{column.max().item()}")
        per_frame = self.rows * self.cols
        within = offset % per_frame
        return offset // per_frame, within // self.cols, within % self.cols


@dataclass(frozen=True, eq=False)
class TokenRoles:
    """The role of every token column of one forward pass, and the images' grids.

    Attributes:
        codes: (B, L) int8, indices into :data:`ROLES` (``pad`` where the attention mask is 0).
        images: every image span, sorted by (sequence, start).
    """

    codes: Tensor
    images: tuple[ImageSpan, ...] = ()

    def mask(self, *names: str) -> Tensor:
        """(B, L) bool: tokens whose role is one of ``names`` (``mask("image")``, ``mask("text", "system")``)."""
        return codes_in(self.codes, role_codes(names))

    def spans(self, sequence: int) -> list[ImageSpan]:
        """The image spans of batch row ``sequence``, in order."""
        return [span for span in self.images if span.sequence == sequence]

    def span_index(self) -> Tensor:
        """(B, L) long on ``codes``' device: the index in :attr:`images` of the image span holding each column, -1
        outside every image. Computed once per TokenRoles (cached; the roles are immutable)."""
        cached = self.__dict__.get("_span_index")
        if cached is None:
            cached = torch.full(self.codes.shape, -1, dtype=torch.long)
            for index, span in enumerate(self.images):
                cached[span.sequence, span.start:span.end] = index
            cached = cached.to(self.codes.device)
            self.__dict__["_span_index"] = cached  # frozen dataclass: bypass __setattr__ for the cache only
        return cached

    def extend_generated(self, new: int) -> TokenRoles:
        """These roles followed by ``new`` generated columns (a decoding step appends tokens after the prompt)."""
        extra = torch.full((self.codes.shape[0], new), GENERATED, dtype=self.codes.dtype, device=self.codes.device)
        return TokenRoles(torch.cat([self.codes, extra], dim=1), self.images)

    def then(self, chunk: TokenRoles) -> TokenRoles:
        """These roles followed by ``chunk``'s columns (a prompt continued over a KV cache: a new turn, chunked
        prefill); ``chunk``'s images are renumbered after these."""
        past = self.codes.shape[1]
        counts = {row: len(self.spans(row)) for row in range(self.codes.shape[0])}
        later = tuple(dataclasses.replace(span.shifted(past), index=span.index + counts.get(span.sequence, 0))
                      for span in chunk.images)
        return TokenRoles(torch.cat([self.codes, chunk.codes.to(self.codes.device)], dim=1), self.images + later)

    def to(self, device: torch.device | str) -> TokenRoles:
        """The same roles with ``codes`` on ``device``."""
        return TokenRoles(self.codes.to(device), self.images)

    @classmethod
    def from_input_ids(cls, input_ids: Tensor, valid: Tensor, image_token_ids: Sequence[int],
                       grids: Tensor | Mapping[int, Tensor] | None = None, merge: int = 1,
                       system: Tensor | None = None, tokens_per_image: int | None = None,
                       position_ids: Tensor | None = None) -> TokenRoles:
        """Roles from token ids: image where the id is an image token id, text elsewhere, pad where not ``valid``.

        Each maximal run of one image token id in a row is one image (a tile, for processors that split images),
        or ``k`` images when ``tokens_per_image`` is given and the run holds k·tokens_per_image tokens (adjacent
        images). Its grid, in this order of preference:
        - the next row of ``grids`` for its token id (``image_grid_thw`` / ``video_grid_thw``: frames, height,
          width in vision patches; height and width shrink by ``merge`` when the model merges patches, Qwen2-VL's
          spatial_merge_size 2); a mapping {token id: grids} keeps images and videos apart;
        - multi-axis RoPE ``position_ids`` (A, B, L) whose last three axes are (t, h, w) (Qwen2-VL, when generate
          passes no grids): the span of each axis over the run;
        - a square (LLaVA, PaliGemma, Gemma 3, Idefics3 tiles); otherwise the grid is unknown (``grid_known=False``).

        Args:
            input_ids: (B, L) long. valid: (B, L) bool, real tokens. image_token_ids: ids that mark image tokens.
            grids: (num_images, 3) long in batch order, a {token id: grids} mapping, or None. merge: patch merge
                factor (≥ 1). system: (B, L) bool, tokens of a system prompt, or None. tokens_per_image: tokens of
                one image when the model fixes it (LLaVA's image_seq_length), or None.
            position_ids: (A, B, L) long multi-axis positions, or None.
        Raises:
            ShapeError: shapes disagree. ConfigError: a run does not match its grid, or there are more runs of a
                token id than grids for it.
        """
        if input_ids.shape != valid.shape or input_ids.dim() != 2:
            raise ShapeError(f"input_ids and valid must both be (batch, seq_len); got {tuple(input_ids.shape)} and "
                             f"{tuple(valid.shape)}")
        valid = valid.bool()
        image = (codes_in(input_ids, list(image_token_ids)) & valid) if image_token_ids else torch.zeros_like(valid)
        codes = torch.full(input_ids.shape, TEXT, dtype=torch.int8, device=input_ids.device)
        if system is not None:
            codes[system.bool()] = SYSTEM
        codes[image] = IMAGE
        codes[~valid] = PAD
        by_id = _grids_by_id(grids, image_token_ids)
        used = dict.fromkeys(by_id, 0)
        runs = sorted((row, start, length, token) for token in image_token_ids
                      for row, start, length in _runs((input_ids == token) & valid))
        spans, per_row = [], {}
        for row, start, length, token in runs:
            pieces = [(start, length)]
            if tokens_per_image and token not in by_id and length % tokens_per_image == 0:
                pieces = [(start + k * tokens_per_image, tokens_per_image) for k in range(length // tokens_per_image)]
            for piece_start, piece_length in pieces:
                index = per_row.get(row, 0)
                per_row[row] = index + 1
                if token in by_id:
                    table = by_id[token]
                    if used[token] >= len(table):
                        raise ConfigError(f"the processor gave {len(table)} grids for token id {token} but the "
                                          f"tokens hold more images (sequence {row}, column {piece_start})")
                    frames, height, width = (int(v) for v in table[used[token]])
                    used[token] += 1
                    shape = (height // merge, width // merge, frames, True)
                else:
                    shape = _grid_from_positions(position_ids, row, piece_start, piece_length) or \
                        _square(piece_length)
                span = ImageSpan(row, piece_start, shape[0], shape[1], shape[2], index, shape[3])
                if span.length != piece_length:
                    raise ConfigError(f"image {index} of sequence {row} has {piece_length} tokens but its grid "
                                      f"{shape[2]}×{shape[0]}×{shape[1]} holds {span.length}")
                spans.append(span)
        return cls(codes, tuple(spans))


def _grids_by_id(grids: Tensor | Mapping[int, Tensor] | None, token_ids: Sequence[int]) -> dict[int, Tensor]:
    if grids is None:
        return {}
    if isinstance(grids, Mapping):
        return {int(token): table for token, table in grids.items() if table is not None}
    return {int(token): grids for token in token_ids[:1]}  # one table: the first (image) token id's


def _square(length: int) -> tuple[int, int, int, bool]:
    side = math.isqrt(length)
    return (side, side, 1, True) if side * side == length else (1, length, 1, False)


def _grid_from_positions(position_ids: Tensor | None, row: int, start: int, length: int
                         ) -> tuple[int, int, int, bool] | None:
    """(rows, cols, frames, True) from multi-axis positions whose last three axes are (t, h, w), or None."""
    if position_ids is None or position_ids.dim() != 3 or position_ids.shape[0] < 3 \
            or position_ids.shape[-1] < start + length:
        return None
    t, h, w = (position_ids[axis, row, start:start + length] for axis in range(-3, 0))
    frames, rows, cols = (int(axis.max() - axis.min()) + 1 for axis in (t, h, w))
    return (rows, cols, frames, True) if rows * cols * frames == length else None


def _runs(flags: Tensor) -> list[tuple[int, int, int]]:
    """(row, start, length) of every maximal run of True in a (B, L) bool tensor, row by row."""
    runs = []
    padded = torch.nn.functional.pad(flags.int(), (1, 1))
    edges = padded[:, 1:] - padded[:, :-1]  # +1 where a run starts, -1 after it ends
    for row in range(flags.shape[0]):
        starts = (edges[row] == 1).nonzero().flatten().tolist()
        ends = (edges[row] == -1).nonzero().flatten().tolist()
        runs.extend((row, start, end - start) for start, end in zip(starts, ends))
    return runs


_GIVEN: contextvars.ContextVar[TokenRoles | None] = contextvars.ContextVar("attnlab_given_roles", default=None)


@contextlib.contextmanager
def given_roles(roles: TokenRoles) -> Iterator[TokenRoles]:
    """Use ``roles`` for the next forward passes inside the block instead of deriving them from the token ids
    (an input builder that marks a system prompt). Decoding steps inside the block extend them with generated
    tokens."""
    token = _GIVEN.set(roles)
    try:
        yield roles
    finally:
        _GIVEN.reset(token)


def current_given_roles() -> TokenRoles | None:
    """The roles set by the innermost :func:`given_roles` block, or None."""
    return _GIVEN.get()


# "after the last image": one rule for the edits (key columns of a call) and the analyses (columns of a batch) ---------

def last_image_column(image: Tensor) -> Tensor:
    """(B,) long: each row's last image column, -1 in a row without one.

    Args:
        image: (B, L) bool, the real image tokens (role ``image`` and valid: ``codes == IMAGE``, or the image
            token ids of ``input_ids`` masked by the attention mask).
    """
    columns = torch.arange(image.shape[-1], device=image.device).expand_as(image)
    return torch.where(image, columns, -1).amax(dim=-1)


def after_last_image(image: Tensor, valid: Tensor) -> Tensor:
    """(B, L) bool: the ``valid`` columns after their row's last image column (none in a row without an image).

    Args:
        image: (B, L) bool, the real image tokens. valid: (B, L) bool, the real tokens.
    """
    last = last_image_column(image)
    columns = torch.arange(image.shape[-1], device=image.device)[None, :]
    return (columns > last[:, None]) & (last[:, None] >= 0) & valid.bool()
