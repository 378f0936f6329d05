#!/usr/bin/env bash
# The five reproductions of issue 11 (settings: examples/lab/PLAN.md), in two lanes of one thread each.
# Results land in ${OUT:-runs}/; docs/findings.md quotes them. About 2.5 hours on the reference 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
lane_a() {
  attnlab sweep examples/lab/configs/sink_emergence.yaml --jobs 1 --out "$OUT/sink_emergence"
  for wd in 0.0 0.5; do
    attnlab train --config "$OUT/sink_emergence/configs/masked-w128-lr0.001-lm_char64.yaml" \
      --weight-decay "$wd" --out "$OUT/sink_emergence_wd$wd"
  done
  attnlab sweep examples/lab/configs/entropy_collapse.yaml --jobs 1 --out "$OUT/entropy_collapse"
}
lane_b() {
  [ -f "$OUT/molecular/molecular.json" ] || python examples/lab/molecular_attention.py --out "$OUT/molecular"
  python examples/lab/active_dormant.py --out "$OUT/bbm"
  python examples/lab/mqar.py --out "$OUT/mqar" --jobs 1
}
lane_a > "$OUT/lane_a.log" 2>&1 &
lane_b > "$OUT/lane_b.log" 2>&1 &
wait
