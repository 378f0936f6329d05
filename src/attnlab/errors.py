"""Exceptions raised by attnlab.

Every attnlab error subclasses :class:`AttnlabError` and the matching builtin, so callers can catch either
(``except ValueError`` keeps working). The CLI turns :class:`UsageError` subclasses into a one-line message and
exit code 2; anything else is a runtime failure (exit code 1).
"""

from __future__ import annotations


class AttnlabError(Exception):
    """Base class of every error attnlab raises on purpose."""


class UsageError(AttnlabError):
    """Bad input from the user (CLI exit code 2)."""


class ShapeError(UsageError, ValueError):
    """A tensor has the wrong shape, e.g. key heads that do not divide query heads."""


class ConfigError(UsageError, ValueError):
    """A configuration value is out of range or inconsistent."""


class RegistryError(UsageError, KeyError):
    """An unknown probe/edit/layer/asset name. The message lists the known names and the nearest one."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class TextError(UsageError, ValueError):
    """Input text is empty, not UTF-8, or too short for one window."""


class UnsupportedModelError(UsageError, TypeError):
    """The model does not route attention through transformers' AttentionInterface."""


class AssetError(AttnlabError, RuntimeError):
    """A bundled asset could not be fetched, verified or unpacked."""


class EditNotFiredError(AttnlabError, RuntimeError):
    """An edit was requested but no attention call passed through it."""


class TrainingDivergedError(AttnlabError, RuntimeError):
    """A training run's loss became NaN or infinite (a runtime failure: exit code 1 from the CLI)."""


class DistributedError(AttnlabError, RuntimeError):
    """A multi-process run failed: another rank died or timed out, or the process group could not start (exit 1)."""


class AgreedUsageError(UsageError, ValueError):
    """A usage error one rank of a multi-process run raised, made known to every rank
    (:func:`attnlab.distributed.agree`): every rank raises it (exit 2), its message names the failing rank, and
    the CLI prints it on rank 0 only (``agreed`` is True)."""

    agreed = True


class AgreedDistributedError(DistributedError):
    """A runtime error one rank of a multi-process run raised, made known to every rank
    (:func:`attnlab.distributed.agree`): every rank raises it (exit 1), its message names the failing rank, and
    the CLI prints it on rank 0 only (``agreed`` is True)."""

    agreed = True


def one_line(error: BaseException, limit: int = 300) -> str:
    """The error's message on one line: whitespace collapsed, the class name when empty, at most ``limit``
    characters (the one-line errors of the CLI)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
