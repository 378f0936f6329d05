"""TempScale on MiniLM: the length-collapse curve with and without a temperature τ < 1 (docs/findings.md).

    python examples/tempscale_length_collapse.py [--taus 1,0.9,0.8,0.7] [--lengths 8,16,32,64,128,256] [--count 16]

Zhou et al. 2025 (TempScale, METHODS.md #6): embeddings of long texts collapse toward one direction; dividing the
attention logits by τ < 1 is meant to counter it. For each τ this script encodes ``count`` passages of the bundled
corpus at each length (bucket n holds the first n text tokens of passages starting at evenly spaced offsets, with
[CLS] … [SEP] added), mean-pools the last hidden states over all tokens (as sentence-transformers does for MiniLM),
and prints the mean pairwise cosine similarity per length: the ``mean_cosine`` statistic of the ``length_collapse``
probe, recomputed here because that probe opens its own Session and cannot run inside an edited one. The pooling
and cosine are the probe's; the passages are not: here passage i starts at i · (max(lengths) + 16) tokens, while
the probe spaces its passages evenly over all of its text (offset i · text tokens // count), so the two tables
measure different passages. τ = 1 runs with no edit at all; τ < 1 is ``temperature:tau=τ,variant=constant``. Output: one JSON line per τ, then a table.
"""

from __future__ import annotations

import argparse
import json

import torch

from attnlab import Session, load_model, load_text


def mean_cosine(model, tokenizer, passages: list[list[int]], edits: list[str]) -> float:
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    input_ids = torch.tensor([[cls, *ids, sep] for ids in passages])  # (count, n + 2), all the same length
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.no_grad():
        if edits:
            with Session(model, edits=edits):
                hidden = model(**batch).last_hidden_state
        else:
            hidden = model(**batch).last_hidden_state
    embeddings = hidden.double().mean(dim=1)  # (count, hidden_size)
    unit = embeddings / embeddings.norm(dim=-1, keepdim=True)
    cosine = unit @ unit.T
    off_diagonal = ~torch.eye(len(passages), dtype=torch.bool)
    return float(cosine[off_diagonal].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taus", default="1,0.9,0.8,0.7")
    parser.add_argument("--lengths", default="8,16,32,64,128,256")
    parser.add_argument("--count", type=int, default=16)
    args = parser.parse_args()
    taus = [float(t) for t in args.taus.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    model, tokenizer = load_model("minilm-l6")
    spacing = max(lengths) + 16
    windows = load_text(tokenizer, None, seq_len=spacing, max_windows=args.count, bos="never")
    starts = [w["ids"] for w in windows.windows]
    table = {}
    for tau in taus:
        edits = [] if tau == 1.0 else [f"temperature:tau={tau},variant=constant"]  # logits / tau at every length
        table[tau] = {n: mean_cosine(model, tokenizer, [ids[:n] for ids in starts], edits) for n in lengths}
        print(json.dumps({"tau": tau, "mean_cosine": table[tau]}))
    print("tau  " + "  ".join(f"n={n:<5d}" for n in lengths))
    for tau, row in table.items():
        print(f"{tau:<4g} " + "  ".join(f"{row[n]:.4f} " for n in lengths))


if __name__ == "__main__":
    main()
