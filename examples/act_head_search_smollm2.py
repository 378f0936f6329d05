"""ACT head selection on SmolLM2, restricted to layers 2, 15 and 28 (docs/findings.md).

Search on one 256-token window, check the kept heads on the next two (held out). Prints one JSON line.

    python examples/act_head_search_smollm2.py
"""

import json
import time

from attnlab import load_model
from attnlab.edits import EDITS
from attnlab.evaluation.lm_tasks import plan_windows
from attnlab.evaluation.runner import text_ids
from attnlab.evaluation.search import act_head_search, measure

model, tokenizer = load_model("smollm2-135m")
ids, _ = text_ids(tokenizer, None, window_tokens=256, stride=256, max_windows=3)
plans = plan_windows(len(ids), 256, 256, 3)            # window 0: calibration; windows 1-2: held out
started = time.process_time()
found = act_head_search(model, ids, plans[:1], beta=0.4, theta=0.1, layers=[2, 15, 28], criterion="loss")
kept = [EDITS.get("calibration")(beta=0.4, theta=0.1, layers=[layer], heads=heads)
        for layer, heads in found["kept"].items()]
every = [EDITS.get("calibration")(beta=0.4, theta=0.1, layers=[2, 15, 28])]
held_out = {name: measure(model, ids, plans[1:], edits) for name, edits in
            (("baseline", []), ("kept heads", kept), ("all heads of layers 2, 15, 28", every))}
print(json.dumps({"kept": found["kept"], "baseline_calibration": found["baseline"],
                  "reference_beta_1": found["reference"],
                  "heads": [(h["layer"], h["head"], round(h["delta_nll"], 5)) for h in found["heads"]],
                  "held_out": held_out, "cpu_s": round(time.process_time() - started, 1)}))
