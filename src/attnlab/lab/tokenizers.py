"""Tokenizers for lab models, built with the ``tokenizers`` library and wrapped for transformers.

A checkpoint saves its tokenizer beside the weights, so ``attnlab report --model runs/x/checkpoint`` can read
text with it:

- :func:`char_tokenizer`: one token per character of a fixed alphabet (the bundled corpus's characters for
  ``bigram_backcopy`` and char-level language modelling), special tokens first.
- :func:`with_bos`: a copy of a tokenizer that puts BOS first when encoding with special tokens, for tasks whose
  sequences start with BOS (so ``attnlab.text``'s ``bos="auto"`` feeds BOS first, as the task trained).
- :func:`number_tokenizer`: tokens ``"0" … "V-1"`` separated by spaces, for synthetic tasks over integer vocabularies
  (``mqar``): the text ``"12 7 4099"`` is the id sequence [12, 7, 4099].
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from attnlab.errors import ConfigError

if TYPE_CHECKING:  # annotations only; transformers loads when a tokenizer is built
    from transformers import PreTrainedTokenizerFast

__all__ = ["char_tokenizer", "number_tokenizer", "with_bos"]


def _wrap(tokenizer: Tokenizer, specials: dict[str, str]) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **specials)


def with_bos(tokenizer: Any) -> Any:
    """A copy of a fast tokenizer that puts its BOS token first when encoding with special tokens.

    A ``<bos> $A`` template post-processor runs after the tokenizer's own one (if any), and ``add_bos_token`` is
    True, so ``tokenizer("a").input_ids[0] == bos_token_id`` and :func:`attnlab.text.load_text` with
    ``bos="auto"`` prepends BOS. The template is saved in ``tokenizer.json``. A tokenizer that already adds BOS
    is copied unchanged. Raises ConfigError if the tokenizer has no BOS token.
    """
    from attnlab.text import tokenizer_adds_bos

    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    if bos is None or bos_id is None:
        raise ConfigError("cannot add BOS: the tokenizer has no bos_token")
    result = copy.deepcopy(tokenizer)
    if tokenizer_adds_bos(result):
        return result
    template = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1",
                                             special_tokens=[(bos, bos_id)])
    backend = result.backend_tokenizer
    existing = backend.post_processor
    backend.post_processor = template if existing is None else processors.Sequence([existing, template])
    object.__setattr__(result, "_add_bos_token", True)  # the property's setter would rebuild the post-processor
    return result


def char_tokenizer(alphabet: str | Sequence[str], specials: Sequence[str] = ("<bos>", "<unk>"), *,
                   add_bos: bool = False) -> PreTrainedTokenizerFast:
    """One id per character: ``specials`` take ids 0 … len(specials)-1, then ``alphabet`` in the order given.

    ``"<bos>"``, ``"<unk>"``, ``"<pad>"`` and ``"<eos>"`` among ``specials`` become the tokenizer's BOS/UNK/PAD/EOS
    tokens; characters outside the alphabet map to ``<unk>`` (ConfigError if there is none and one is needed).
    With ``add_bos`` (needs ``"<bos>"`` among ``specials``) encoding with special tokens puts ``<bos>`` first
    (see :func:`with_bos`), as tasks whose sequences start with BOS train; otherwise the tokenizer adds no special
    tokens by itself. The tasks place BOS in their sequences themselves and encode without special tokens.

    Raises ConfigError for an empty or repeated alphabet, a special that is also a character, or ``add_bos``
    without ``"<bos>"``.
    """
    chars = list(alphabet)
    if not chars or len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
        raise ConfigError(f"expected an alphabet of distinct single characters, got {len(chars)} entries "
                          f"({len(set(chars))} distinct)")
    if set(specials) & set(chars) or len(set(specials)) != len(specials):
        raise ConfigError(f"expected distinct special tokens that are not characters, got {list(specials)}")
    vocab = {token: index for index, token in enumerate([*specials, *chars])}
    unk = "<unk>" if "<unk>" in specials else None
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # characters join without separators
    if specials:
        tokenizer.add_special_tokens(list(specials))
    names = {"<bos>": "bos_token", "<unk>": "unk_token", "<pad>": "pad_token", "<eos>": "eos_token"}
    wrapped = _wrap(tokenizer, {names[s]: s for s in specials if s in names})
    if add_bos:
        if "<bos>" not in specials:
            raise ConfigError(f"add_bos=True needs '<bos>' among the special tokens, got {list(specials)}")
        return with_bos(wrapped)
    return wrapped


def number_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Tokens ``"0" … str(vocab_size-1)``, split on whitespace; id i is the token ``str(i)``.

    No special tokens: synthetic tasks use plain ids (e.g. MQAR's 0 is its padding/noise token by definition).
    Raises ConfigError for vocab_size < 1. ``decode`` joins tokens with spaces.
    """
    if vocab_size < 1:
        raise ConfigError(f"expected vocab_size >= 1, got {vocab_size}")
    vocab = {str(index): index for index in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap(tokenizer, {})
