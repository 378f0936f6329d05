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
# masks whose parameters are tensors computed from model states: nothing to print without a model
DATA_DEPENDENT = {"dma": "dma_keep", "sparsed": "sparsed_block_keep", "groups": "group ids of real tokens"}


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
        if head < 0:
            raise ConfigError(f"expected --head >= 0, got {head}")
        factory = MASKS.get(name)
        if name in DATA_DEPENDENT:
            raise ConfigError(f"mask {name!r} is built from model states (a tensor from {DATA_DEPENDENT[name]}) and "
                              "cannot be printed here; build it in Python (attnlab.functional.sparse_masks)")
        params = parse_params(set_ or [])
        heads = params.get("num_heads")
        if isinstance(heads, int) and head >= heads:
            raise ConfigError(f"expected --head < num_heads={heads}, got {head}")
        try:
            mask_mod = factory(**params)
        except TypeError as error:
            raise ConfigError(f"bad parameters for mask {name!r}: {error}") from None
        typer.echo(to_string(mask_mod, q_len, keys, head_idx=head, q_offset=keys - q_len))

    run_guarded(body, debug)
