"""Where attnlab's time goes: torch profiler table of one forward pass of the bundled model with probes on.

    .venv/bin/python benchmarks/profile_probes.py --length 4096 --probes entropy sink distance norms
    .venv/bin/python benchmarks/profile_probes.py --length 4096 --probe-kernel blocked   # the oracle path

Prints the operators sorted by self CPU time (after one untimed warm-up pass). Not packaged; not imported by attnlab.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

import attnlab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--probes", nargs="+", default=["entropy", "sink", "distance", "norms"])
    parser.add_argument("--rows", type=int, default=20, help="operators to list")
    parser.add_argument("--probe-kernel", choices=["fused", "blocked"], default="fused",
                        help="Session(probe_kernel=...): the fused kernel (default) or the blocked oracle")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = attnlab.load_model("smollm2-135m")
    batch = next(iter(attnlab.load_text(tokenizer, None, seq_len=args.length, max_windows=1)))
    with torch.no_grad():
        with attnlab.Session(model, probes=args.probes, probe_kernel=args.probe_kernel):
            model(**batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof, \
                attnlab.Session(model, probes=args.probes, probe_kernel=args.probe_kernel):
            model(**batch)
    print(f"probe_kernel={args.probe_kernel} length={args.length} probes={args.probes} "
          f"threads={torch.get_num_threads()} loadavg={os.getloadavg()}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
