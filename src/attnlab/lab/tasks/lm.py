"""Language modelling on the bundled corpus: random windows of Shakespeare, next-token labels everywhere.

Definition (attnlab's own; the usual nanoGPT-style setup):

- Text: :func:`attnlab.text.corpus_text` (the bundled plays). Split by characters: the first
  ``1 - eval_fraction`` of the text is ``train``, the rest ``eval`` (default: the last 10 % for eval), each split
  tokenized on its own, so no window crosses the boundary and the split is the same at both levels.
- ``level="char"``: one id per character, :func:`attnlab.lab.tokenizers.char_tokenizer` over the corpus's
  characters with specials ``<bos>`` (id 0) and ``<unk>`` (id 1). ``level="tokenizer"``: the bundled SmolLM2
  tokenizer (49,152 ids; read from the bundled model's GGUF file or its converted copy, without the weights;
  the first tokenization of the 5 M characters takes some seconds, once per process).
- A sequence: with ``bos`` the tokenizer's BOS followed by ``seq_len`` text tokens starting at a uniformly drawn
  offset of the split, else ``seq_len + 1`` text tokens; ``input_ids = window[:-1]``, ``labels = window[1:]``
  (aligned: every position is labelled with its next token).
- The offsets of batch ``step`` of a split come from ``SeedSequence([seed, split_id, step])``.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import numpy as np
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from attnlab.lab.tasks import TASKS
from attnlab.lab.tasks.base import Split, Task, check
from attnlab.lab.tokenizers import char_tokenizer, with_bos
from attnlab.params import Range, validated

__all__ = ["LanguageModelling", "bundled_tokenizer"]

Level = Literal["char", "tokenizer"]
BUNDLED_MODEL = "smollm2-135m"


def bundled_tokenizer() -> Any:
    """The bundled SmolLM2 tokenizer, without loading the model: from the converted copy
    ``$ATTNLAB_HOME/smollm2-135m/hf-fp32`` when :func:`attnlab.load_model` made one, else from the GGUF file."""
    from attnlab.assets import asset_dir, fetch_asset

    converted = asset_dir(BUNDLED_MODEL) / "hf-fp32"
    if (converted / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(converted)
    gguf = fetch_asset(BUNDLED_MODEL)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@functools.lru_cache(maxsize=1)
def _corpus_chars() -> str:
    from attnlab.text import corpus_text

    return "".join(sorted(set(corpus_text())))


@functools.lru_cache(maxsize=1)
def _bundled() -> Any:
    return bundled_tokenizer()


def _tokenizer(level: Level) -> Any:
    """A fresh char tokenizer (cheap), or the bundled one (loaded once per process; shared, do not modify it)."""
    return char_tokenizer(_corpus_chars(), specials=("<bos>", "<unk>")) if level == "char" else _bundled()


@functools.lru_cache(maxsize=4)
def _split_ids(level: Level, eval_fraction: float) -> dict[str, np.ndarray]:
    """The token ids of each split (int64), computed once per process per (level, eval_fraction)."""
    from attnlab.text import corpus_text

    text = corpus_text()
    cut = round(len(text) * (1 - eval_fraction))
    parts = {"train": text[:cut], "eval": text[cut:]}
    if level == "char":
        codes = np.frombuffer(_corpus_chars().encode("utf-32-le"), dtype=np.uint32)
        offset = 2  # <bos>, <unk>
        return {name: np.searchsorted(codes, np.frombuffer(part.encode("utf-32-le"), dtype=np.uint32)) + offset
                for name, part in parts.items()}
    tokenizer = _tokenizer(level)
    return {name: np.asarray(tokenizer(part, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)
            for name, part in parts.items()}


@TASKS.register("lm")
class LanguageModelling(Task):
    """Language modelling on the bundled Shakespeare corpus, character-level or with the bundled tokenizer."""

    @validated
    def __init__(self, level: Level = "char", seq_len: Annotated[int, Range(ge=2, le=1 << 16)] = 256,
                 bos: bool = True, eval_fraction: Annotated[float, Range(ge=0.01, le=0.5)] = 0.1,
                 seed: Annotated[int, Range(ge=0)] = 0) -> None:
        """Raises ConfigError for a value out of its range. Reads (and fetches) the corpus on construction."""
        self.level, self.seq_len, self.bos, self.eval_fraction, self.seed = level, seq_len, bos, eval_fraction, seed
        tokenizer = _tokenizer(level)
        self.vocab_size = len(tokenizer)
        self.bos_id = tokenizer.bos_token_id
        check(not bos or self.bos_id is not None, "lm", f"bos=True but the {level} tokenizer has no BOS token")

    def split_ids(self, split: Split) -> np.ndarray:
        """(N,) int64: the token ids of one split of the corpus."""
        ids = _split_ids(self.level, self.eval_fraction)[split]
        text_len = self.seq_len if self.bos else self.seq_len + 1
        check(len(ids) >= text_len, "lm", f"the {split} split has {len(ids)} tokens but a window needs {text_len}")
        return ids

    def sample(self, rng: np.random.Generator, batch_size: int, split: Split) -> tuple[np.ndarray, np.ndarray]:
        ids = self.split_ids(split)
        text_len = self.seq_len if self.bos else self.seq_len + 1
        starts = rng.integers(0, len(ids) - text_len + 1, size=batch_size)
        windows = ids[starts[:, None] + np.arange(text_len)]  # (B, text_len)
        if self.bos:
            windows = np.concatenate([np.full((batch_size, 1), self.bos_id, dtype=np.int64), windows], axis=1)
        return windows[:, :-1], windows[:, 1:]

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The char tokenizer over the corpus's characters (``<bos>``, ``<unk>`` first), or the bundled one.

        With ``bos`` it puts BOS first when encoding with special tokens (:func:`with_bos`), as the task's sequences
        start, so ``attnlab report`` on a checkpoint (BOS policy ``auto``) feeds ``<bos>`` first.
        """
        return with_bos(_tokenizer(self.level)) if self.bos else _tokenizer(self.level)
