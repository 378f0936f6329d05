"""ACT's head search and ZeroTuning's γ search / profiling on SmolLM2, scored on the cloze multiple-choice task
(docs/findings/edit_search.md). Writes OUT/choice_search_<run>.json and prints a short summary.

    python examples/choice_search_smollm2.py zerotuning OUT            # γ on every head
    python examples/choice_search_smollm2.py profile OUT               # profile layer 2, γ per head group
    python examples/choice_search_smollm2.py act OUT                   # ACT head search, layers 2 and 15
    python examples/choice_search_smollm2.py act OUT 192 1             # the replication: 192 items, item seed 1

Items: 96 cloze items from the bundled corpus (4 choices, 32-token contexts, seed 0; or COUNT and SEED from the
command line), split in half by seed 0.
"""

import json
import sys
import time
from pathlib import Path

from attnlab import load_model
from attnlab.evaluation.choice_search import choice_search
from attnlab.evaluation.choice_tasks import cloze_items
from attnlab.io_utils import atomic_write_text

RUNS = {
    "zerotuning": {"kind": "zerotuning"},
    "profile": {"kind": "zerotuning", "profile": True, "layers": [2], "criterion": "loss",
                "gammas": (0.5, 0.7, 1.5, 2.0)},
    "act": {"kind": "act", "layers": [2, 15], "beta": 0.4, "theta": 0.1, "criterion": "accuracy"},
}

run, out = sys.argv[1], Path(sys.argv[2])
count, item_seed = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (96, 0)
name = run if (count, item_seed) == (96, 0) else f"{run}_{count}_seed{item_seed}"
model, tokenizer = load_model("smollm2-135m")
items = cloze_items(tokenizer, count=count, num_choices=4, seed=item_seed, context_tokens=32)
started = time.perf_counter()
found = choice_search(model=model, tokenizer=tokenizer, items=items, seed=0, norm="none", batch_size=32,
                      progress=True, **RUNS[run])
found["settings"] = {"run": run, **{k: v for k, v in RUNS[run].items()}, "items": f"cloze count={count} num_choices=4 "
                     f"seed={item_seed} context_tokens=32", "wall_s": round(time.perf_counter() - started, 1)}
atomic_write_text(out / f"choice_search_{name}.json", json.dumps(found, indent=1, default=str))
print(json.dumps({label: {k: v for k, v in got.items() if k != "edits"} for label, got in found["test"].items()}))
print("wall_s", found["settings"]["wall_s"])
