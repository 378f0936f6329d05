"""``attnlab mask NAME``: print a registered mask as an ASCII grid with its density."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from attnlab.cli.options import Debug, run_guarded
from attnlab.errors import ConfigError

MaskParams = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Mask parameter KEY=VALUE (repeatable; JSON values), e.g. --set window=3.")]
QLen = Annotated[int, typer.Option("--q-len", help="Query rows to print (query positions kv_len - q_len ...).")]
KvLen = Annotated[Optional[int], typer.Option("--kv-len", help="Keys to print (default: q-len).")]
Head = Annotated[int, typer.Option("--head", help="Query head to print.")]


def parse_params(items: list[str]) -> dict:
    """``["window=3", "causal=false"]`` → ``{"window": 3, "causal": False}`` (values parsed as JSON, else str)."""
    params = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def mask_command(name: str, set_: MaskParams = None, q_len: QLen = 16, kv_len: KvLen = None, head: Head = 0,
                 debug: Debug = False) -> None:
    """Print mask NAME (`attnlab ls masks`) as a grid of '#' (attend) and '.' with its density."""

    def body() -> None:
        from attnlab.functional.masks import MASKS, to_string

        keys = q_len if kv_len is None else kv_len
        if q_len < 1 or keys < q_len:
            raise ConfigError(f"expected 1 <= q-len <= kv-len, got {q_len} and {keys}")
        factory = MASKS.get(name)
        try:
            mask_mod = factory(**parse_params(set_ or []))
        except TypeError as error:
            raise ConfigError(f"bad parameters for mask {name!r}: {error}") from None
        typer.echo(to_string(mask_mod, q_len, keys, head_idx=head, q_offset=keys - q_len))

    run_guarded(body, debug)
