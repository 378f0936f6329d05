"""The path planner's whole table, with no model: every branch, every fallback reason, each logged once."""

from __future__ import annotations

import logging

import pytest

from attnlab.capture.planner import CallFacts, EditFacts, Needs, Options, Path, Planner, fallback_reason, plan

NONE, PROBS, EVERY_ROW = Needs(), Needs(probs=True), Needs(probs=True, every_row=True)
NO_EDITS, FAST, SLOW_FLEX, SLOW = EditFacts(), EditFacts(True, True, True), EditFacts(True, False, True), \
    EditFacts(True, False, False)
PLAIN, SOFTCAP = CallFacts(), CallFacts(softcap=True)
FULL, SAMPLED, FLEX, FLEX_SAMPLED = Options(), Options(query_fraction=0.5), Options(flex=True), \
    Options(query_fraction=0.5, flex=True)

# (needs, edits, call, options) -> path, and a word the fallback reason must contain (None: no fallback)
TABLE = [
    # no edits
    (NONE, NO_EDITS, PLAIN, FULL, Path.SDPA, None),
    (NONE, NO_EDITS, PLAIN, SAMPLED, Path.SDPA, None),
    (NONE, NO_EDITS, SOFTCAP, FULL, Path.BLOCKED_EAGER, "soft-caps"),
    (PROBS, NO_EDITS, PLAIN, FULL, Path.BLOCKED_EAGER, None),
    (PROBS, NO_EDITS, PLAIN, SAMPLED, Path.SDPA_SAMPLED, None),
    (PROBS, NO_EDITS, SOFTCAP, SAMPLED, Path.BLOCKED_EAGER, "soft-caps"),
    (EVERY_ROW, NO_EDITS, PLAIN, SAMPLED, Path.BLOCKED_EAGER, "every query row"),
    (EVERY_ROW, NO_EDITS, PLAIN, FULL, Path.BLOCKED_EAGER, None),
    (NONE, NO_EDITS, PLAIN, FLEX, Path.SDPA, None),  # flex is for edits only
    # edits with a fast form
    (NONE, FAST, PLAIN, FULL, Path.SDPA_EDITS, None),
    (NONE, FAST, PLAIN, FLEX, Path.SDPA_EDITS, None),  # SDPA first: flex only where SDPA cannot
    (PROBS, FAST, PLAIN, FULL, Path.BLOCKED_EAGER_EDITS, None),
    (PROBS, FAST, PLAIN, SAMPLED, Path.SDPA_EDITS_SAMPLED, None),
    (EVERY_ROW, FAST, PLAIN, SAMPLED, Path.BLOCKED_EAGER_EDITS, "every query row"),
    (NONE, FAST, SOFTCAP, FULL, Path.BLOCKED_EAGER_EDITS, "soft-caps"),  # logged with edits as without
    (NONE, FAST, SOFTCAP, SAMPLED, Path.BLOCKED_EAGER_EDITS, "soft-caps"),
    (PROBS, FAST, SOFTCAP, FULL, Path.BLOCKED_EAGER_EDITS, None),  # probs need the blocked kernel anyway
    (PROBS, FAST, SOFTCAP, SAMPLED, Path.BLOCKED_EAGER_EDITS, "soft-caps"),
    # edits without a fast form
    (NONE, SLOW_FLEX, PLAIN, FULL, Path.BLOCKED_EAGER_EDITS, None),
    (NONE, SLOW, SOFTCAP, FULL, Path.BLOCKED_EAGER_EDITS, None),  # no SDPA form: not the soft-cap's doing
    (NONE, SLOW_FLEX, PLAIN, FLEX, Path.FLEX_EDITS, None),
    (NONE, SLOW_FLEX, SOFTCAP, FLEX, Path.BLOCKED_EAGER_EDITS, "soft-caps"),
    (NONE, SLOW, PLAIN, FLEX, Path.BLOCKED_EAGER_EDITS, "no FlexAttention form"),
    (PROBS, SLOW_FLEX, PLAIN, FLEX, Path.BLOCKED_EAGER_EDITS, "a probe needs probs"),
    (PROBS, SLOW, PLAIN, SAMPLED, Path.BLOCKED_EAGER_EDITS, "no fast (SDPA) form"),
    (PROBS, SLOW_FLEX, PLAIN, FLEX_SAMPLED, Path.BLOCKED_EAGER_EDITS, "a probe needs probs"),
]


@pytest.mark.parametrize("needs, edits, call, options, path, reason", TABLE,
                         ids=[f"{row[4].value}-{i}" for i, row in enumerate(TABLE)])
def test_plan_table(needs, edits, call, options, path, reason):
    assert plan(needs, edits, call, options) is path
    explained = fallback_reason(needs, edits, call, options, path)
    if reason is None:
        assert explained is None
    else:
        assert reason in explained


def test_the_table_reaches_every_path():
    # not planned: "implied" (the session records it for layers that show their implied map, attnlab.lab) and
    # "fused" (the session's choice for a blocked_eager call the fused probe kernel serves; tests/probes) and
    # "block_sparse+edits" (the session's choice for an edited call with a block form; tests/diffusion)
    assert {row[4] for row in TABLE} == set(Path) - {Path.IMPLIED, Path.FUSED, Path.BLOCK_SPARSE_EDITS}


def test_path_values_are_the_results_json_strings():
    assert [p.value for p in Path] == ["sdpa", "blocked_eager", "fused", "sdpa+sampled_probs", "sdpa+edits",
                                       "sdpa+edits+sampled_probs", "flex+edits", "blocked_eager+edits", "implied",
                                       "block_sparse+edits"]
    assert Path("flex+edits") is Path.FLEX_EDITS and Path.SDPA == "sdpa"


def test_needs_and_edit_facts_from_their_sources():
    assert Needs.of([frozenset({"value"}), frozenset({"probs", "every_row"})]) == Needs(True, True, True)
    assert Needs.of([]) == Needs()

    class Edited:
        def is_fast(self):
            return False

        def flex_ready(self):
            return True

    assert EditFacts.of(None, flex=True) == NO_EDITS
    assert EditFacts.of(Edited(), flex=True) == EditFacts(True, False, True)
    assert EditFacts.of(Edited(), flex=False) == EditFacts(True, False, False)  # flex off: Flex forms not built


def test_each_fallback_is_logged_once(caplog):
    planner = Planner(FLEX)
    with caplog.at_level(logging.INFO, logger="attnlab.capture.planner"):
        for _ in range(5):
            assert planner.choose(NONE, SLOW, PLAIN) is Path.BLOCKED_EAGER_EDITS
            assert planner.choose(PROBS, SLOW_FLEX, PLAIN) is Path.BLOCKED_EAGER_EDITS
            assert planner.choose(NONE, SLOW_FLEX, PLAIN) is Path.FLEX_EDITS
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert any("no FlexAttention form" in m for m in messages) and any("a probe needs probs" in m for m in messages)


def test_the_session_machinery_methods_say_what_they_do():
    from attnlab.capture.edit_log import EditLog
    from attnlab.capture.executors import Job
    from attnlab.edits.apply import EditedCall

    for method in (Planner.choose, Job.rows, EditLog.for_layer, EditedCall.keep.fget, EditedCall.is_fast):
        assert (method.__doc__ or "").strip(), method.__qualname__
