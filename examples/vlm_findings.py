"""VLM methods on the lab's small VLM: which edits change accuracy and the hallucination rate (docs/findings.md).

    flock /work/runs/bench.lock env OMP_NUM_THREADS=1 PYTHONPATH=src \
        python examples/vlm_findings.py --runs /work/runs/vlm16 [--update-docs docs/findings.md]

Settings are fixed below, before any run (issue 16): two models trained once each with the same seed, data and
budget (`BASE`: raster RoPE positions; `CCA`: CCA's concentric positions and mask, as Xing et al. retrain LLaVA),
then every variant scored on the same fixed test set (500 questions per kind; hallucination rate = `yes` to the
250 absent objects). A model directory that already exists under --runs is reused (not retrained); its
`vlm_lab.json` must hold the settings below, or the script stops.

Variants (each one Session on the unedited weights; none tuned on the test set):

| variant | model | what |
|---|---|---|
| baseline | BASE | no edit |
| VAR | BASE | `var` (Kang et al. 2025, METHODS.md #8), paper defaults |
| VHR | BASE | heads chosen by VHD on a calibration set disjoint from the test set (He et al. 2025, METHODS.md #7) |
| CCA (trained) | CCA | the CCA-trained model in its own layout |
| CCA (edit) | BASE | `cca` applied to the baseline without retraining (an intervention, not the paper's model) |
| CARVE | BASE | contrastive attention mask, re-query on the masked image (Ge et al. 2025, METHODS.md #19) |
| imbalanced-attention fix | BASE | `dual_stream` (the Jan 2025 method, METHODS.md entry added in issue 16), defaults |
| GIFT | BASE | `gift` (METHODS.md entry added in issue 16), defaults |

HOOKS: each method enters through one constant or function below (`VAR_EDITS`, `CCA_EDITS`, `IMBALANCE_EDITS`,
`GIFT_EDITS`, `vhr_edits`, `carve_answers`). A method that is not available yet (its edit not registered,
its module missing) is reported as `pending` with the reason, and the other rows still run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

from attnlab.lab.vlm.evaluate import evaluate, eval_items
from attnlab.lab.vlm.model import LAB_JSON, load_vlm
from attnlab.lab.vlm.train import VlmTrainConfig, train_vlm

# ---- fixed settings (decided before the runs) -------------------------------------------------------------------
PER_KIND = 500
CALIBRATION_PER_KIND = 50  # VHR's head selection and CARVE's settings: questions from another seed
CALIBRATION_SEED = 7
TRAIN = dict(steps=2500, batch_size=32, lr=2e-3, warmup_steps=100, questions_per_image=4, seed=0,
             eval_per_kind=PER_KIND)
BASE = VlmTrainConfig(positions="rope", **TRAIN)
CCA = VlmTrainConfig(positions="cca", **TRAIN)

# ---- hooks for the methods other helpers build ------------------------------------------------------------------
VAR_EDITS = ["var"]  # edits/var.py, paper defaults (p=0.6, tau=20, rho=0.5, summ=0.2, except_last_layer)
CCA_EDITS = ["cca"]  # edits/cca.py: ring ids + concentric mask on the real image grid, without retraining
IMBALANCE_EDITS = ["dual_stream"]  # edits/dual_stream.py: the Jan 2025 imbalanced-attention fix, its defaults
GIFT_EDITS = ["gift"]  # edits/gift.py, its defaults
VHR_FRACTION, VHR_ALPHA = 0.25, 2.0  # select_vhr's defaults (counterfactual "drop", measured at the last token)
CARVE_SETTINGS = dict(layers=None, lam=1e-3, keep=0.3)  # protocols/carve.py defaults (second half of the layers)


def vhr_edits(model: Any, processor: Any, calibration: list) -> list:
    """VHR's edit: heads chosen layer by layer by VHD (:func:`attnlab.analyses.vhd.select_vhr`) on ``calibration``
    items (one prompt per batch, so "the last token" is the question's last token), scaled by α."""
    try:
        from attnlab.analyses.vhd import select_vhr
        from attnlab.capture.architectures import model_facts
        from attnlab.capture.vlm_runner import VisionRunner
    except ImportError as error:
        raise Pending(f"VHR not in this checkout ({error})") from None
    from attnlab.lab.vlm.data import encode

    runner = VisionRunner(model, processor.tokenizer, model_facts(model))
    batches = [encode([item], processor, answers=False) for item in calibration]
    edit = select_vhr(runner, batches, fraction=VHR_FRACTION, alpha=VHR_ALPHA)
    print(f"VHR selection: {edit.spec()}", file=sys.stderr)
    return [edit]


def carve_answers(model: Any, processor: Any, items: list) -> list[str]:
    """CARVE's answers (:func:`attnlab.protocols.carve.carve`, its defaults): the contrast map of the question
    against the generic instruction, the image masked outside the kept tokens, the question asked again; the first
    word of the one generated token."""
    try:
        from attnlab.protocols.carve import carve
    except ImportError as error:
        raise Pending(f"CARVE not in this checkout ({error})") from None
    from PIL import Image

    answers = []
    for scene, question in items:
        result = carve(model, Image.fromarray(scene.image()), question.text, processor=processor, max_new_tokens=1,
                       **CARVE_SETTINGS)
        answers.append((result.answer.split() or [""])[0])
    return answers


class Pending(Exception):
    """A method that is not available in this checkout."""


# ---- the run ---------------------------------------------------------------------------------------------------
def trained(runs: Path, name: str, config: VlmTrainConfig) -> tuple[Any, Any, dict]:
    out = runs / name
    checkpoint = out / "checkpoint"
    if not (checkpoint / LAB_JSON).is_file():
        print(f"training {name} ({config.positions} positions, {config.steps} steps) ...", file=sys.stderr)
        train_vlm(dataclass_replace(config, out=str(out)), progress=True)
    model, processor, lab = load_vlm(checkpoint)
    expected = {**config.to_dict(), "out": lab["train"].get("out")}
    if lab["train"] != expected:
        raise SystemExit(f"{checkpoint} was trained with other settings than this script fixes; "
                         f"use another --runs or remove it")
    return model, processor, lab


def dataclass_replace(config: VlmTrainConfig, **changes: Any) -> VlmTrainConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def registered(specs: list[str]) -> None:
    from attnlab.edits import EDITS

    if not specs:
        raise Pending("no edit name given yet")
    missing = [s.split(":")[0] for s in specs if s.split(":")[0] not in EDITS.names()]
    if missing:
        raise Pending(f"edit(s) not registered in this checkout: {', '.join(missing)}")


def carve_report(model: Any, processor: Any, lab: dict) -> dict:
    from attnlab.lab.vlm.questions import KINDS

    items = eval_items(PER_KIND)
    words = carve_answers(model, processor, items)
    right = [w == q.answer for w, (_, q) in zip(words, items)]
    absent = [w == "yes" for w, (_, q) in zip(words, items) if q.kind == "presence" and q.absent]
    present = [w == "yes" for w, (_, q) in zip(words, items) if q.kind == "presence" and not q.absent]
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731
    return {"accuracy": mean(right), "per_kind": {k: mean([r for r, (_, q) in zip(right, items) if q.kind == k])
                                                  for k in KINDS},
            "hallucination_rate": mean(absent), "yes_rate_present": mean(present), "num_questions": len(items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="Where the two trained models live (or go).")
    parser.add_argument("--out", type=Path, default=None, help="Output directory (default: RUNS/findings).")
    parser.add_argument("--update-docs", type=Path, default=None,
                        help="Replace (or append) the '## VLM methods' section of this markdown file.")
    args = parser.parse_args()
    out = args.out or args.runs / "findings"
    out.mkdir(parents=True, exist_ok=True)
    base, processor, base_lab = trained(args.runs, "base", BASE)
    cca_model, cca_processor, cca_lab = trained(args.runs, "cca", CCA)
    calibration = eval_items(CALIBRATION_PER_KIND, seed=CALIBRATION_SEED)

    rows: dict[str, dict] = {}

    def run(name: str, work: Callable[[], dict]) -> None:
        started = time.monotonic()
        try:
            rows[name] = {"status": "ok", **work(), "seconds": time.monotonic() - started}
        except Pending as reason:
            rows[name] = {"status": "pending", "reason": str(reason)}
        print(f"{name}: {rows[name]}", file=sys.stderr)

    def edited(specs: list[str]) -> dict:
        registered(specs)
        return evaluate(base, processor, base_lab, per_kind=PER_KIND, edits=specs)

    run("baseline", lambda: evaluate(base, processor, base_lab, per_kind=PER_KIND))
    run("VAR", lambda: edited(VAR_EDITS))
    run("VHR", lambda: evaluate(base, processor, base_lab, per_kind=PER_KIND,
                                edits=vhr_edits(base, processor, calibration)))
    run("CCA (trained)", lambda: evaluate(cca_model, cca_processor, cca_lab, per_kind=PER_KIND))
    run("CCA (edit)", lambda: edited(CCA_EDITS))
    run("CARVE", lambda: carve_report(base, processor, base_lab))
    run("imbalanced-attention fix", lambda: edited(IMBALANCE_EDITS))
    run("GIFT", lambda: edited(GIFT_EDITS))

    results = {"settings": {"train": BASE.to_dict(), "per_kind": PER_KIND, "calibration_per_kind":
                            CALIBRATION_PER_KIND, "calibration_seed": CALIBRATION_SEED,
                            "edits": {"var": VAR_EDITS, "cca": CCA_EDITS, "imbalance": IMBALANCE_EDITS, "gift": GIFT_EDITS},
                            "vhr": {"fraction": VHR_FRACTION, "alpha": VHR_ALPHA}, "carve": CARVE_SETTINGS},
               "models": {"base": base_lab, "cca": cca_lab}, "variants": rows}
    (out / "vlm_findings.json").write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    table = markdown(rows)
    (out / "vlm_findings.md").write_text(table)
    print(table)
    if args.update_docs is not None:
        update_section(args.update_docs, table)
    print(f"files: {out / 'vlm_findings.json'} {out / 'vlm_findings.md'}", file=sys.stderr)


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| variant | accuracy | presence | colour | count | position | hallucination rate | yes on present |",
             "|---|---|---|---|---|---|---|---|"]
    pct = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f} %"  # noqa
    for name, row in rows.items():
        if row["status"] != "ok":
            lines.append(f"| {name} | pending: {row['reason']} | | | | | | |")
            continue
        kinds = row["per_kind"]
        lines.append(f"| {name} | {pct(row['accuracy'])} | {pct(kinds['presence'])} | {pct(kinds['colour'])} | "
                     f"{pct(kinds['count'])} | {pct(kinds['position'])} | {pct(row['hallucination_rate'])} | "
                     f"{pct(row['yes_rate_present'])} |")
    return "\n".join(lines) + "\n"


def update_section(path: Path, table: str) -> None:
    """Replace the body of ``## VLM methods`` in ``path`` (up to the next ``## ``) with the table, or append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    heading = "## VLM methods"
    body = (f"{heading}\n\nThe lab's small VLM (docs/vlm_lab.md), settings fixed in examples/vlm_findings.py before "
            f"the run; {PER_KIND} test questions per kind, one run.\n\n{table}\n")
    if heading in text:
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + body + (text[end + 1:] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
