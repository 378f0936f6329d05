"""role_attention and visual_sinks over shards: two Sessions over halves of the sequences (numbered globally, as a
shard's are), exported through safetensors + JSON, merged, equal one Session over everything (tiny LLaVA)."""

from __future__ import annotations

import torch

import attnlab
from attnlab.distributed import decode_state, encode_state
from attnlab.probes import PROBES
from attnlab.shards import bundle_of, load_bundle, merge_bundles
from tests.probes.vlm_helpers import tiny_llava, vlm_batch


def _probes():
    return [PROBES.get("role_attention")(overlays=3), PROBES.get("visual_sinks")(tau=2.5)]


def _observe(model, batches, first=0):
    with attnlab.Session(model, probes=_probes()) as session:
        session.num_sequences = first
        for batch in batches:
            with torch.no_grad():
                model(**batch)
    return session


def _rows(probe):
    return {(r["statistic"], r["layer"], r["head"], r["position"]): r["value"] for r in probe.rows()}


def test_merged_halves_equal_one_run():
    model = tiny_llava()
    a, b = vlm_batch(5), vlm_batch(6)
    whole = _observe(model, [a, b])
    first, second = _observe(model, [a]), _observe(model, [b], first=2)
    parts = [decode_state(encode_state(*bundle_of(s.probes, s.attention_paths))) for s in (first, second)]
    fresh = attnlab.Session(model, probes=_probes()).probes
    load_bundle(fresh, merge_bundles(fresh, *parts))
    for expected, actual in zip(whole.probes, fresh):
        want, got = _rows(expected), _rows(actual)
        assert want.keys() == got.keys() and want
        assert all(abs(want[k] - got[k]) <= 1e-6 + 1e-5 * abs(want[k]) for k in want), expected.name
    grids = fresh[0].image_grids()
    assert [(g["sequence"], g["image_index"]) for g in grids] == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)]
    assert fresh[1].extras()["sink_grids"] == whole.probes[1].extras()["sink_grids"]
