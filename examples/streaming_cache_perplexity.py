"""StreamingLLM as a KV-cache policy: per-token loss when the model reads the corpus one token at a time.

The `sink_window` edit measured by `attnlab eval` is the prefill-mask form (original positions). This script
measures the generation form, `attnlab.capture.cache.SinkWindowCache`: keys stored before RoPE and re-rotated to
in-cache positions, tokens evicted after each step. The first `--prefill` tokens go in one forward (no eviction
happens while the cache is under budget, so this equals feeding them one by one); every later token is fed alone.
Full attention is one forward over the window. Loss = next-token NLL (nats) of tokens 1…N-1.

    python examples/streaming_cache_perplexity.py --seq-len 2048 --max-windows 1     # ~5 min on 2 cores

Prints a table and writes JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import attnlab
from attnlab.capture.cache import SinkWindowCache


def token_losses_with_cache(model, input_ids: torch.Tensor, cache: SinkWindowCache, prefill: int) -> torch.Tensor:
    """(N-1,) NLL of tokens 1…N-1 reading ``input_ids`` (1, N) through ``cache``."""
    logits = []
    with torch.no_grad():
        out = model(input_ids=input_ids[:, :prefill], cache=cache, use_cache=True)
        logits.append(out.logits[0])
        for t in range(prefill, input_ids.shape[1] - 1):
            out = model(input_ids=input_ids[:, t : t + 1], cache=cache, use_cache=True)
            logits.append(out.logits[0])
    logp = torch.log_softmax(torch.cat(logits).float(), dim=-1)  # (N-1, V): row t predicts token t+1
    targets = input_ids[0, 1:]
    return -logp.gather(1, targets[:, None])[:, 0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=1)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--variants", default="0:256,4:252", help="sinks:window pairs, comma-separated")
    p.add_argument("--bin", type=int, default=256)
    p.add_argument("--json", type=Path, default=Path("bench-results/streaming_cache.json"))
    args = p.parse_args()
    model, tokenizer = attnlab.load_model("smollm2-135m")
    variants = [tuple(int(x) for x in pair.split(":")) for pair in args.variants.split(",")]
    losses: dict[str, list[torch.Tensor]] = {"full": []}
    for batch in attnlab.load_text(tokenizer, None, seq_len=args.seq_len, max_windows=args.max_windows):
        for row in batch["input_ids"]:
            ids = row[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            losses["full"].append(-logp.gather(1, ids[0, 1:, None])[:, 0])
            for sinks, window in variants:
                name = f"cache sinks={sinks},window={window}"
                cache = SinkWindowCache(model, sinks=sinks, window=window)
                losses.setdefault(name, []).append(token_losses_with_cache(model, ids, cache, args.prefill))
    result = {"seq_len": args.seq_len, "windows": len(losses["full"]), "prefill": args.prefill, "variants": {}}
    for name, per_window in losses.items():
        nll = torch.stack(per_window)  # (windows, N-1)
        bins = [float(nll[:, s : s + args.bin].mean()) for s in range(0, nll.shape[1], args.bin)]
        result["variants"][name] = {"perplexity": math.exp(float(nll.mean())), "mean_nll": float(nll.mean()),
                                    f"nll_by_{args.bin}_tokens": bins}
        print(f"{name:32s} perplexity {math.exp(float(nll.mean())):8.2f}  by bin: "
              + " ".join(f"{b:.2f}" for b in bins))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
