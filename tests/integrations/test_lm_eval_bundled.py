"""The lm-eval model ``attnlab`` on the bundled SmolLM2 (slow: needs the fetched model), ≤ 64 tokens per request.

The oracle is lm-eval's own HFLM on the same loaded weights and tokenizer (SmolLM2's GGUF tokenizer: BOS id 1, no
BOS added by ``encode``, so the prefix token of an empty context is 1).
"""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from attnlab.integrations.lm_eval import AttnlabLM  # noqa: E402

PAIRS = [("To be, or not to be, that is the", " question"), ("The capital of France is", " Paris"),
         ("", "Once upon a time"), ("On the table, I see a red pen and a blue mug. What color is the mug? Answer:",
                                    " blue")]
LOGLIK_ATOL = 1e-3  # sums over a few tokens of a 30-layer float32 model, batched/padded vs one by one


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def lms():
    lm = AttnlabLM(pretrained="smollm2-135m", batch_size=4, progress=False)
    return lm, HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=1)


def test_smollm2_matches_hflm(lms):
    lm, ref = lms
    requests = _requests("loglikelihood", PAIRS)
    ours, theirs = lm.loglikelihood(requests), ref.loglikelihood(requests)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in theirs], abs=LOGLIK_ATOL)
    assert ours[1][0] > -5.0  # " Paris" is likely after "The capital of France is": a trained model, not noise
    rolling = _requests("loglikelihood_rolling", [("Now is the winter of our discontent made glorious summer.",)])
    assert lm.loglikelihood_rolling(rolling) == pytest.approx(ref.loglikelihood_rolling(rolling), abs=LOGLIK_ATOL)
    generate = _requests("generate_until", [("The capital of France is", {"until": ["."], "max_gen_toks": 6})])
    assert lm.generate_until(generate) == ref.generate_until(generate)
