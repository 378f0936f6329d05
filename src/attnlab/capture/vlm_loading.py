"""Loading vision-language models (image-text-to-text): which Auto class, and their processor.

:func:`attnlab.capture.loading.load_model` loads a folder or hub id whose config is an image-text-to-text
architecture (:func:`attnlab.capture.architectures.is_vision_language`: LLaVA, Qwen2-VL / Qwen2.5-VL,
Idefics3 / SmolVLM, PaliGemma, Gemma 3 …) with ``AutoModelForImageTextToText`` and its processor with
``AutoProcessor`` (never remote code unless ``trust_remote_code``); the tokenizer is the processor's.

Without torchvision, transformers cannot build a video processor, and ``AutoProcessor`` refuses processors that
have one (Qwen2-VL's). Then the processor is rebuilt without it (:func:`image_only_processor`): the same class
with only its image processor (the PIL backend) and tokenizer, which handles images exactly as the full one does
and refuses videos.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from attnlab.capture.architectures import is_causal_lm, is_vision_language
from attnlab.errors import UsageError, one_line

logger = logging.getLogger(__name__)


def model_class(config: Any) -> Any:
    """The Auto class that loads a model with ``config``: AutoModelForImageTextToText for a vision-language
    config, AutoModelForCausalLM for a causal LM, else AutoModel."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    if is_vision_language(config):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM if is_causal_lm(config) else AutoModel


class NoVideoProcessor:
    """Stands in for the video processor of an :func:`image_only_processor`: the settings some processors read
    even for images (SmolVLM's ``apply_chat_template`` reads ``num_frames`` and ``fps``) are None; anything else
    is an AttributeError saying that videos need torchvision (transformers probes attributes with ``getattr(…,
    default)``, which needs AttributeError)."""

    num_frames = None
    fps = None

    def __getattr__(self, name: str) -> Any:
        raise AttributeError("videos need transformers' video processor, which needs torchvision (pip install "
                          f"torchvision); this processor was loaded without one (asked for {name!r})")


@cache
def image_only_processor(cls: type) -> type:
    """A subclass of the processor class ``cls`` (e.g. Qwen2VLProcessor) without its video processor.

    Same name, same image and text handling; its ``__init__`` takes ``image_processor``, ``tokenizer`` and
    ``chat_template`` only, so it can be built and saved where torchvision (which transformers' video processors
    need) is not installed. A processor without a ``video_processor`` argument is returned unchanged.
    """
    import inspect

    if "video_processor" not in inspect.signature(cls.__init__).parameters:
        return cls

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                 **kwargs: Any) -> None:
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                       "video_processor": NoVideoProcessor(),
                                       "__doc__": f"{cls.__name__} without its video processor (attnlab)."})


def _processor_class(config: Any) -> type | None:
    """The transformers processor class registered for the config's model_type, or None."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", None))
    return getattr(transformers, name, None) if isinstance(name, str) else None


def load_processor(name_or_path: Any, config: Any, *, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """The processor of a vision-language model folder or hub id (``kwargs``: ``local_files_only`` …).

    ``AutoProcessor.from_pretrained`` first; if that fails on the video processor (no torchvision), the model
    type's processor class without it (:func:`image_only_processor`). A package the processor needs and lacks
    (SmolVLM's ``num2words``) is a one-line UsageError; other errors propagate (the loader turns them into
    one-line UsageErrors).
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, ImportError, AttributeError, TypeError) as error:
        cls = _processor_class(config)
        if cls is None or image_only_processor(cls) is cls:
            if isinstance(error, ImportError):  # a package the processor needs (SmolVLM: num2words)
                raise UsageError(f"cannot load the processor of {name_or_path}: {one_line(error)}") from None
            raise
        logger.info("%s: loading its processor without the video processor (%s)", name_or_path,
                    one_line(error, 120))
        try:
            return image_only_processor(cls).from_pretrained(name_or_path, **kwargs)
        except ImportError as second:
            raise UsageError(f"cannot load the processor of {name_or_path}: {one_line(second)}") from None
        except Exception as second:  # noqa: BLE001 - the first error is the one to report
            logger.debug("%s: the image-only processor failed too: %s", name_or_path, one_line(second))
            raise error from None


def processor_tokenizer(processor: Any) -> Any:
    """The tokenizer inside a processor (``processor.tokenizer``)."""
    return getattr(processor, "tokenizer", processor)


def reads_images(name_or_path: Any) -> bool | None:
    """Whether the model at ``name_or_path`` is a vision-language model, read from its config alone (no weights):
    True or False for a local folder with a readable config.json, a ``.gguf`` file or a bundled name (text
    models), or a hub id in the local hub cache; None when that cannot be told without loading (the loader's own
    checks then apply)."""
    import os
    from pathlib import Path

    from transformers import AutoConfig

    from attnlab.assets import ASSETS

    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if (name in ASSETS and not path.exists()) or (path.is_file() and path.suffix == ".gguf"):
        return False
    source, kwargs = (path, {}) if (path / "config.json").is_file() else (name, {"local_files_only": True})
    if source is name and ("/" not in name or path.exists()):
        return None
    try:
        return is_vision_language(AutoConfig.from_pretrained(source, **kwargs))
    except Exception as error:  # noqa: BLE001 - unreadable here: the loader reports it
        logger.debug("%s: config not read ahead of loading (%s)", name, one_line(error))
        return None


def check_model_kind(name_or_path: Any, *, images: bool = False, tokenizer: Any = None) -> None:
    """ConfigError (one line) before any weight loads: images (``--image``/``--manifest``) for a text model, or a
    separate ``--tokenizer`` for a vision-language model (its tokenizer comes with its processor)."""
    from attnlab.errors import ConfigError

    if not images and tokenizer is None:
        return
    vision = reads_images(name_or_path)
    if images and vision is False:
        raise ConfigError(f"--image/--manifest need a vision-language model; {name_or_path} is text-only "
                          "(by its config; nothing loaded)")
    if tokenizer is not None and vision:
        raise ConfigError(f"{name_or_path} is a vision-language model: its tokenizer comes with its processor; "
                          f"drop --tokenizer {tokenizer}")
