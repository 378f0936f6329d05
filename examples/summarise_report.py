"""Print the headline numbers of an `attnlab report` run, per layer, from its results files.

    attnlab report --out runs/smollm2
    python examples/summarise_report.py runs/smollm2

Columns: sink rate (share of (window, head) pairs with alpha_0 > epsilon), median normalised entropy over heads,
median power-law exponent over heads (fixed-row fit, sink dropped), residual-peak ratio, median value-drain ratio
over kv heads. Then the tokens that most often act as hidden sinks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def main(run_dir: str) -> None:
    run = Path(run_dir)
    frame = pd.read_csv(run / "results.csv", dtype={"layer": "Int64", "head": "Int64", "position": "Int64"})
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))

    def per_layer(statistic: str, how: str = "median") -> pd.Series:
        rows = frame[(frame.statistic == statistic) & frame.layer.notna()]
        return rows.groupby("layer")["value"].agg(how)

    table = pd.DataFrame({
        "sink_rate": per_layer("sink_rate", "mean"),
        "norm_entropy": per_layer("normalised_entropy"),
        "power_law_no_sink": per_layer("power_law_exponent_no_sink"),
        "residual_peak": per_layer("residual_peak_ratio", "mean"),
        "value_drain": per_layer("value_drain_ratio_kv"),
    })
    overall = frame[(frame.statistic == "sink_rate") & frame.layer.isna()]["value"]
    config = results["config"]
    print(f"model {results['model']['name']} ({results['model']['class']}), {len(results['windows'])} windows x "
          f"{config['seq_len']} tokens, bos_added={results['tokenizer'].get('bos_added')}")
    if len(overall):
        print(f"sink rate over all layers and heads: {overall.iloc[0]:.3f}")
    print(table.round(3).to_string())
    tokens = results.get("extras", {}).get("sink", {}).get("extreme_tokens", [])[:10]
    if tokens:
        print("\nhidden-sink tokens (hits = (window, layer, head) triples; heads = distinct (layer, head)):")
        for row in tokens:
            print(f"  {row['token']!r:>14} hits={row['hits']:4d} heads={row['heads']:3d} max={row['max_score']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "attnlab-report")
