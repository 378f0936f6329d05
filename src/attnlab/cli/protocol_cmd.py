"""``attnlab protocol <name>``: the protocols of :mod:`attnlab.protocols`, one subcommand each.

Each protocol's command function lives in its own ``cli/protocol_<name>.py``; :data:`PROTOCOL_COMMANDS` lists
them (subcommand name → function) and ``cli/main.py`` adds each to the ``protocol`` group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attnlab.cli.protocol_data_quality import data_quality_command
from attnlab.cli.protocol_inflection_lora import inflection_lora_command
from attnlab.cli.protocol_memory import memory_command
from attnlab.cli.protocol_retrieval import retrieval_command

PROTOCOL_COMMANDS: dict[str, Callable[..., Any]] = {
    "retrieval": retrieval_command,
    "inflection-lora": inflection_lora_command,
    "memory": memory_command,
    "data-quality": data_quality_command,
}
