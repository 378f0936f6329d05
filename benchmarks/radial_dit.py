"""Forward time of a Wan-style video transformer: dense attention vs radial attention on the block-sparse path.

Model: a random ``diffusers.WanTransformer3DModel`` (``--layers`` blocks, default 4; ``--heads`` × ``--head-dim``,
default 4 × 32; patch (1, 2, 2); latent ``--latent`` × ``--latent`` pixels, default 32, so 16 × 16 = 256 patch
tokens per frame; 8 text tokens), batch 1, eval mode, ``torch.no_grad()``. Per latent frame count (``--frames``,
default 4 8 16: 1024, 2048, 4096 tokens) the configurations of ``--configs``:

- ``sdpa``: the plain forward (diffusers' own SDPA; the baseline);
- ``session``: the same forward inside a ``DiffusionSession`` with no probe and no edit (the session's overhead);
- ``radial_block``: ``DiffusionSession(edits=[radial:...,block_size=B])`` with every step and block sparse
  (``dense_steps=0,dense_layers=0``): self-attention calls take the ``block_sparse+edits`` path when the session
  hook is wired (``attention_paths`` in the JSON says which path ran);
- ``radial_masked``: the same edit with the block-sparse hook switched off (``attnlab.capture.session.block_form``
  replaced by a function returning None in this process): dense masked SDPA (``sdpa+edits``), the oracle path.

Both radial configurations also pay for the edit machinery (the dense keep mask the EditedCall builds, L² bools).
``--verify-rows`` (default 0) sets the session's per-call verification rows (16 in the library's default).
Reported per (frames, config): median wall seconds of ``--repeats`` forwards after ``--warmup`` untimed ones, the
ratio to ``sdpa``, the attention paths, and, for the radial mask, the kept tile fraction of the self-attention
(``tile_fraction``). The radial outputs are compared (max abs difference) between the two radial paths.

    python benchmarks/radial_dit.py --json bench-results/radial_dit.json              # default run
    python benchmarks/radial_dit.py --frames 2 4 --repeats 2 --latent 16              # smoke test (~20 s)
    python benchmarks/radial_dit.py --device cuda --dtype bfloat16 --frames 8 16 32   # on a GPU

This file is not part of the attnlab package and is never imported by it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_overhead import machine_header  # noqa: E402

CONFIGS = ("sdpa", "session", "radial_block", "radial_masked")
TEXT_TOKENS = 8


def build_model(args: argparse.Namespace) -> Any:
    import diffusers
    import torch

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=args.heads,
                                            attention_head_dim=args.head_dim, in_channels=4, out_channels=4,
                                            text_dim=32, freq_dim=32, ffn_dim=4 * args.heads * args.head_dim,
                                            num_layers=args.layers, rope_max_seq_len=1024)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def inputs(args: argparse.Namespace, frames: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    dtype = getattr(torch, args.dtype)
    latent = torch.randn(1, 4, frames, args.latent, args.latent, generator=g)
    text = torch.randn(1, TEXT_TOKENS, 32, generator=g)
    return {"hidden_states": latent.to(args.device, dtype), "timestep": torch.tensor([500.0], device=args.device),
            "encoder_hidden_states": text.to(args.device, dtype)}


def tile_fraction(args: argparse.Namespace, frames: int) -> float:
    """Kept block_size tiles / all tiles of the self-attention's radial mask (the block rule, patches only)."""
    from attnlab.functional.sparse_masks import coarsen_to_blocks, radial

    per_frame = (args.latent // 2) ** 2
    mask = radial(frames, per_frame, decay_factor=args.decay_factor, min_window=args.block_size,
                  sink_frames=args.sink_frames)
    length = frames * per_frame
    return float(coarsen_to_blocks(mask, length, length, args.block_size).float().mean())


def time_config(model: Any, x: dict[str, Any], config: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from attnlab.diffusion import DiffusionSession

    spec = (f"radial:decay_factor={args.decay_factor},sink_frames={args.sink_frames},dense_steps=0,dense_layers=0,"
            f"block_size={args.block_size}")
    edits = [spec] if config.startswith("radial") else []
    session = None
    restore = None
    if config == "radial_masked":
        import attnlab.capture.session as capture_session

        if hasattr(capture_session, "block_form"):
            restore = capture_session.block_form
            capture_session.block_form = lambda job: None
    times: list[float] = []
    try:
        with torch.no_grad():
            for index in range(args.warmup + args.repeats):
                if config == "sdpa":
                    sync(args.device)
                    start = time.perf_counter()
                    output = model(**x)[0]
                else:
                    session = DiffusionSession(model, edits=edits, verify_rows=args.verify_rows)
                    with session:
                        sync(args.device)
                        start = time.perf_counter()
                        output = model(**x)[0]
                sync(args.device)
                if index >= args.warmup:
                    times.append(time.perf_counter() - start)
    finally:
        if restore is not None:
            import attnlab.capture.session as capture_session

            capture_session.block_form = restore
    paths = sorted(set(session.attention_paths.values())) if session is not None else ["sdpa"]
    return {"wall_s": statistics.median(times), "wall_all_s": times, "paths": paths, "output": output.float().cpu()}


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--latent", type=int, default=32, help="latent height = width in pixels (patch 2)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--decay-factor", type=float, default=0.2)
    parser.add_argument("--sink-frames", type=int, default=1)
    parser.add_argument("--verify-rows", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", type=Path, default=Path("bench-results/radial_dit.json"))
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    doc: dict[str, Any] = {"machine": {**machine_header(), "benchmark": "radial_dit", "argv": sys.argv[1:],
                                       "device": args.device, "dtype": args.dtype}, "results": []}
    for frames in args.frames:
        x = inputs(args, frames)
        tokens = frames * (args.latent // 2) ** 2
        runs = {config: time_config(model, x, config, args) for config in args.configs}
        base = runs.get("sdpa", {}).get("wall_s")
        fraction = tile_fraction(args, frames)
        for config, run in runs.items():
            row = {"frames": frames, "tokens": tokens, "config": config, "wall_s": run["wall_s"],
                   "wall_all_s": run["wall_all_s"], "vs_sdpa": None if not base else run["wall_s"] / base,
                   "paths": run["paths"], "tile_fraction": fraction if config.startswith("radial") else 1.0}
            doc["results"].append(row)
            print(f"frames {frames:3d} tokens {tokens:6d} {config:14s} {run['wall_s'] * 1e3:9.1f} ms"
                  f"  x{row['vs_sdpa'] or float('nan'):.2f}  paths {','.join(run['paths'])}"
                  f"  tiles {row['tile_fraction']:.3f}", file=sys.stderr)
        if "radial_block" in runs and "radial_masked" in runs:
            diff = float((runs["radial_block"]["output"] - runs["radial_masked"]["output"]).abs().max())
            doc["results"].append({"frames": frames, "tokens": tokens, "config": "check",
                                   "max_abs_diff_block_vs_masked": diff})
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
