"""The retrieval protocol (TempScale on retrieval, METHODS.md #6): the task builder on hand-checked documents, ranks
and metrics on planted embeddings (expected values by hand), mean pooling, the identity edit, and the CLI."""

from __future__ import annotations

import json
import math
import random

import pandas as pd
import pytest
import torch
from tiny_models import save_model_dir, tiny_bert
from typer.testing import CliRunner

from attnlab.cli.main import app
from attnlab.errors import ConfigError
from attnlab.protocols.retrieval import (RetrievalConfig, build_task, embed, paired_top1, positive_ranks,
                                         rank_summary, run_retrieval, score_length, special_tokens)
from cli.helpers import assert_one_line_error

VOCAB = [f"w{i}" for i in range(60)] + ["aa", "bb", "q1", "q2", "q3", "q4"]


def bert_tokenizer():
    """Word-level tokenizer with BERT's template ([CLS] text [SEP]); ids < 97 so tiny_bert can read them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def random_text(lines=400, seed=1):
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(VOCAB[:60]) for _ in range(rng.randint(2, 7))) for _ in range(lines))


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- the task builder -------------------------------------------------------------------------------------------

def test_special_tokens_are_found_around_the_text():
    tokenizer = bert_tokenizer()
    assert special_tokens(tokenizer) == ([2], [3])


@pytest.mark.parametrize("length", [12, 16])
def test_hand_checked_document_one_query_in_repeated_filler(length):
    """Only 'q1 q2 q3 q4' can be a query (the filler lines repeat and are too short), and every filler reads
    'aa bb aa bb ...', so the document is one of the line-boundary insertions written out below."""
    tokenizer = bert_tokenizer()
    text = "\n".join(["q1 q2 q3 q4"] + ["aa bb"] * 200)
    task = build_task(tokenizer, text, lengths=(length,), num_queries=1, num_distractors=2, min_query_tokens=3,
                      max_query_tokens=4, seed=3)
    assert task.query_lines == ["q1 q2 q3 q4"]
    room = length - 2 - 4  # text tokens around the query
    cut = min(range(0, room + 1, 2), key=lambda b: (abs(b - task.depths[0] * room), b))  # nearest line boundary
    filler = ("aa bb " * 10).split()
    expected = filler[:cut] + "q1 q2 q3 q4".split() + filler[cut:room]
    if length == 12:  # room 6: the four possible documents, written out by hand
        assert " ".join(expected) in {"q1 q2 q3 q4 aa bb aa bb aa bb", "aa bb q1 q2 q3 q4 aa bb aa bb",
                                      "aa bb aa bb q1 q2 q3 q4 aa bb", "aa bb aa bb aa bb q1 q2 q3 q4"}
    documents = task.documents[length]
    assert tokenizer.convert_ids_to_tokens(documents[0]) == expected
    assert task.starts[length] == [cut]
    assert [tokenizer.convert_ids_to_tokens(d) for d in documents[1:]] == [filler[:length - 2]] * 2


def _contains(haystack, needle):
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


def test_documents_hold_their_query_only_have_exact_lengths_and_are_nested():
    tokenizer = bert_tokenizer()
    text = random_text()
    lines = [line for line in text.splitlines() if line.strip()]
    stream, line_starts = [], set()
    for line in lines:
        line_starts.add(len(stream))
        stream += ids(tokenizer, line)
    lengths = (12, 24, 40)
    task = build_task(tokenizer, text, lengths=lengths, num_queries=5, num_distractors=4, min_query_tokens=4,
                      max_query_tokens=6, seed=0)
    assert len(task.queries) == 5 and len(set(task.query_lines)) == 5
    for query, line in zip(task.queries, task.query_lines):
        assert 4 <= len(query) <= 6 and query == ids(tokenizer, line)
        assert sum(other.lower().split() == line.lower().split() for other in lines) == 1  # occurs once
    for length in lengths:
        documents = task.documents[length]
        assert len(documents) == 9 and all(len(d) == length - 2 for d in documents)
        for i, query in enumerate(task.queries):
            start = task.starts[length][i]
            assert documents[i][start:start + len(query)] == query
            for j, document in enumerate(documents):
                if j != i:
                    assert not _contains(document, query), (length, i, j)
            rest = documents[i][:start] + documents[i][start + len(query):]
            # the rest is consecutive text from a line start, and the query sits at a line boundary (or the end)
            offsets = [o for o in sorted(line_starts) if stream[o:o + len(rest)] == rest]
            assert any(o + start in line_starts or start == len(rest) for o in offsets), (length, i)
        for document in documents[5:]:
            assert any(stream[o:o + len(document)] == document for o in line_starts)
    for i in range(9):  # a longer document extends the same passage: distractors are prefixes of the longer ones
        if i >= 5:
            assert task.documents[40][i][:10] == task.documents[12][i]


def test_same_seed_same_task_other_seed_other_task():
    tokenizer, text = bert_tokenizer(), random_text()
    kwargs = dict(lengths=(16,), num_queries=4, num_distractors=2, min_query_tokens=3, max_query_tokens=6)
    first, again = build_task(tokenizer, text, seed=5, **kwargs), build_task(tokenizer, text, seed=5, **kwargs)
    other = build_task(tokenizer, text, seed=6, **kwargs)
    assert first.documents == again.documents and first.query_lines == again.query_lines
    assert first.query_lines != other.query_lines


def test_too_short_a_length_and_too_few_query_lines_are_one_line_errors():
    tokenizer, text = bert_tokenizer(), random_text()
    with pytest.raises(ConfigError, match=r"--lengths 8 leaves 6 text tokens .* lengths >= 9"):
        build_task(tokenizer, text, lengths=(8, 32), num_queries=2, num_distractors=0, min_query_tokens=3,
                   max_query_tokens=6)
    with pytest.raises(ConfigError, match="lines usable as queries"):
        build_task(tokenizer, "\n".join(["aa bb"] * 100), lengths=(16,), num_queries=2, num_distractors=0,
                   min_query_tokens=2, max_query_tokens=4)


# --- ranks and metrics on planted embeddings -------------------------------------------------------------------

def test_ranks_on_planted_embeddings():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    documents = torch.tensor([
        [2.0, 0.2],   # query 0's own
        [0.0, 5.0],   # query 1's own
        [1.0, 0.0],   # query 2's own
        [3.0, 0.0],   # a distractor
    ])
    ranks, cosine = positive_ranks(queries, documents)
    # q0 = (1, 0): own cos 2/sqrt(4.04) = 0.995; docs 2 and 3 have cos 1 → rank 3.
    # q1 = (0, 1): own cos 1; the others have cos 0.0995, 0, 0 → rank 1.
    # q2 = (1, 1): own cos 1/sqrt(2) = 0.7071; doc 0 has 2.2 / (sqrt(2) sqrt(4.04)) = 0.7740 (beats), docs 1
    #     and 3 have exactly 1/sqrt(2) (ties, which count against) → rank 4.
    assert ranks.tolist() == [3, 1, 4]
    assert cosine[2, 0] == pytest.approx(2.2 / (math.sqrt(2) * math.sqrt(4.04)))


def test_accuracy_on_planted_embeddings():
    """Queries e0, e1, e2 (one-hot); documents 0 and 1 point at their query, document 2 leans to e0, and a
    distractor points at e2 more closely than document 2 does: top-1 = 2/3, ranks (1, 1, 2)."""
    eye = torch.eye(4, dtype=torch.float64)
    queries = eye[:3]
    documents = torch.stack([eye[0] + 0.1 * eye[3], eye[1], eye[0] + 0.5 * eye[2], eye[2] + 0.1 * eye[3]])
    ranks, stats = score_length(queries, documents)
    # q0: own cos 1/sqrt(1.01) = 0.995 beats doc 2's 1/sqrt(1.25) = 0.894 → 1.  q1: own cos 1 → 1.
    # q2: own cos 0.5/sqrt(1.25) = 0.447, beaten by doc 3's 1/sqrt(1.01) = 0.995 only → 2.
    assert ranks.tolist() == [1, 1, 2]
    assert stats["top1"] == pytest.approx(2 / 3) and stats["mrr"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert stats["positive_cosine"] == pytest.approx((1 / math.sqrt(1.01) + 1 + 0.5 / math.sqrt(1.25)) / 3)


def test_rank_summary_against_hand_computed_values():
    ranks = torch.tensor([1, 1, 2, 4, 1])
    summary = rank_summary(ranks)
    assert summary["top1"] == pytest.approx(3 / 5)
    assert summary["mrr"] == pytest.approx((1 + 1 + 0.5 + 0.25 + 1) / 5)
    reciprocal = [1, 1, 0.5, 0.25, 1]
    mean = sum(reciprocal) / 5
    sd = math.sqrt(sum((r - mean) ** 2 for r in reciprocal) / 4)
    assert summary["mrr_se"] == pytest.approx(sd / math.sqrt(5))
    z, n, p = 1.959963984540054, 5, 0.6  # Wilson score interval, by its formula
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert summary["top1_low"] == pytest.approx(centre - half, abs=1e-9)
    assert summary["top1_high"] == pytest.approx(centre + half, abs=1e-9)


def test_paired_top1_counts_and_mcnemar_exact_p():
    base = torch.tensor([1, 1, 1, 1, 1, 2, 3])
    now = torch.tensor([2, 3, 2, 2, 2, 2, 1])
    result = paired_top1(base, now)
    assert (result["gained"], result["lost"]) == (1, 5)
    assert result["mcnemar_p"] == pytest.approx(2 * (1 + 6) / 2 ** 6)  # P(X <= 1), X ~ Bin(6, 1/2), two-sided
    assert paired_top1(base, base) == {"gained": 0, "lost": 0, "mcnemar_p": 1.0}


def test_embed_is_the_mean_of_the_last_hidden_states_and_padding_does_not_change_it():
    model = tiny_bert()
    sequences = [[2, 10, 11, 12, 3], [2, 20, 3], [2, 30, 31, 32, 33, 34, 35, 3]]
    batched = embed(model, sequences, pad_id=0, batch_size=3)
    for i, sequence in enumerate(sequences):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([sequence])).last_hidden_state[0]  # (len, hidden), no padding
        expected = torch.stack([hidden[t].double() for t in range(len(sequence))]).sum(0) / len(sequence)
        torch.testing.assert_close(batched[i], expected, rtol=1e-5, atol=1e-6)


# --- whole runs on a tiny random BERT --------------------------------------------------------------------------

@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text(random_text(), encoding="utf-8")
    return path


def _run(text_file, variants, **more):
    config = RetrievalConfig(model="tiny", text=str(text_file), lengths=(12, 32), queries=4, distractors=3,
                             min_query_tokens=3, max_query_tokens=6, batch_size=3, variants=variants, **more)
    return run_retrieval(config, model=tiny_bert(), tokenizer=bert_tokenizer())


def test_identity_edit_changes_nothing_and_a_real_edit_fires(text_file):
    results = _run(text_file, ("temperature:tau=1", "temperature:tau=0.5"))
    table = results["extras"]["retrieval"]["table"]
    by = {(r["variant"], r["length"]): r for r in table}
    for length in (12, 32):
        base, same, sharp = by["baseline", length], by["temperature:tau=1", length], by["temperature:tau=0.5", length]
        assert {k: v for k, v in same.items() if k != "variant"} == {k: v for k, v in base.items() if k != "variant"}
        assert (same["gained"], same["lost"]) == (0, 0)
        assert sharp["doc_mean_cosine"] != base["doc_mean_cosine"]
    reports = {r["label"]: r["edit_report"] for r in results["extras"]["retrieval"]["variants"]}
    assert reports["temperature:tau=0.5"][0]["calls_touched"] > 0
    assert results["command"] == "protocol retrieval" and results["config"]["lengths"] == [12, 32]
    rows = pd.DataFrame(results["rows"])
    assert set(rows.variant) == {"baseline", "temperature:tau=1", "temperature:tau=0.5"}
    assert set(rows.position) == {12, 32}


def test_a_length_beyond_the_models_positions_names_lengths(text_file):
    with pytest.raises(ConfigError, match="--lengths 100 exceeds"):
        config = RetrievalConfig(text=str(text_file), lengths=(12, 100), queries=2, distractors=0,
                                 min_query_tokens=3, max_query_tokens=6)
        run_retrieval(config, model=tiny_bert(), tokenizer=bert_tokenizer())


def test_config_defaults_and_checks():
    config = RetrievalConfig()
    assert config.load.model == "minilm-l6" and config.retrieval.lengths == (32, 64, 128, 256, 512)
    assert RetrievalConfig(lengths="24,32").retrieval.lengths == (24, 32)
    with pytest.raises(ConfigError, match="min_query_tokens must be <= max_query_tokens"):
        RetrievalConfig(min_query_tokens=9, max_query_tokens=8)
    with pytest.raises(ConfigError, match="each length may be given once"):
        RetrievalConfig(lengths=(16, 16))
    with pytest.raises(ConfigError, match="--lengths 8 is too short"):  # 8 < 8 + 1; 8 >= 7 + 1 passes
        RetrievalConfig(lengths=(8, 32), max_query_tokens=8)
    assert RetrievalConfig(lengths=(8, 32), min_query_tokens=3, max_query_tokens=7).retrieval.lengths == (8, 32)


# --- the CLI -----------------------------------------------------------------------------------------------------

def test_cli_writes_results_and_a_loadable_table(tmp_path, text_file):
    folder = str(save_model_dir(tmp_path / "bert", tiny_bert(), bert_tokenizer()))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "protocol", "retrieval", "--model", folder, "--text", str(text_file), "--lengths", "12,24", "--queries", "3",
        "--distractors", "2", "--min-query-tokens", "3", "--max-query-tokens", "6", "--edit", "temperature:tau=0.8",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "temperature:tau=0.8: top-1 (MRR) by length" in result.output
    results = json.loads((out / "results.json").read_text())
    assert len(results["extras"]["retrieval"]["table"]) == 4
    frame = pd.read_csv(out / "results.csv", dtype={"variant": str, "position": "Int64"})
    assert set(frame.statistic) >= {"top1", "mrr", "doc_mean_cosine", "mcnemar_p"}
    assert "Retrieval by document length" in (out / "report.html").read_text()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--lengths", "32,abc"], "--lengths must be a comma-separated list of int"),
    (["--edit", "temperatur:tau=0.8"], "Did you mean"),
    (["--queries", "1"], "queries"),
    (["--lengths", "8,64"], "--lengths 8 is too short: each length needs >= max_query_tokens + 1 = 21"),
])
def test_cli_bad_input_is_a_one_line_error_before_loading(tmp_path, args, fragment):
    result = CliRunner().invoke(app, ["protocol", "retrieval", "--model", str(tmp_path / "missing"), *args,
                                      "--out", str(tmp_path / "run")])
    assert_one_line_error(result, 2, fragment)
