"""The block-sparse attention path: an edited call whose mask is whole tiles runs only the tiles it keeps.

When the one acting edit of a call offers a block form (``edit.block_form(call)``, e.g. ``radial`` with its block
rule: :class:`attnlab.edits.radial.BlockForm`), the model applies no mask of its own, the logits are not
soft-capped and no probe reads probabilities, the session runs
:func:`attnlab.functional.block_sparse.block_sparse_attention` on the tiles the mask keeps instead of dense masked
SDPA, recorded as path ``block_sparse+edits`` (:data:`BLOCK_SPARSE_EDITS`). The dense masked path is its oracle
(tests/diffusion/test_block_sparse_path.py: outputs and gradients).

The block form's token order puts the patches first (the order the mask's tiles are aligned to); the kernel runs on
the permuted query/key/value rows and the output rows are put back, which is exact: attention is equivariant under a
common permutation of the tokens once the mask moves with them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.functional.block_sparse import block_sparse_attention

__all__ = ["BLOCK_SPARSE_EDITS", "block_form", "block_sparse_edits"]

BLOCK_SPARSE_EDITS = "block_sparse+edits"  # the attention path value results record


def block_form(job: Any) -> Any | None:
    """The block form of an edited call (:class:`attnlab.edits.radial.BlockForm`), or None when the call must
    take the planner's path: no edits, more than one acting edit, an edit without a block form for this call, a
    probe that reads probs (``job.observe``), soft-capped logits, or a model mask that hides any pair.

    ``job`` is a :class:`attnlab.capture.executors.Job`.
    """
    edited = job.edited
    if edited is None or job.observe is not None or edited.softcap is not None or len(edited.edits) != 1:
        return None
    own = edited.keeps[0]
    if own is not None and not bool(own.all()):
        return None
    form_of = getattr(edited.edits[0], "block_form", None)
    return None if form_of is None else form_of(job.call)


def block_sparse_edits(job: Any, form: Any | None = None) -> Tensor:
    """The executor of ``block_sparse+edits``: output (B, Lq, Hq, Dv), like every executor.

    ``form``: the call's :func:`block_form` (recomputed when None). The edit's self-verification and counting ran
    already (the session's EditedCall); only the attention itself runs here.

    Raises:
        ValueError: the call has no block form (an internal invariant: the session chose this path from one).
    """
    form = block_form(job) if form is None else form
    if form is None:
        raise ValueError("block_sparse+edits was chosen for a call without a block form")
    query, key, value = job.query, job.key, job.value
    if form.order is not None:
        order = form.order.to(query.device)
        query, key, value = (t.index_select(2, order) for t in (query, key, value))
    output = block_sparse_attention(query, key, value, form.mask_mod, scale=job.call.scale, cache=form.cache)
    if form.order is not None:
        output = output.index_select(2, torch.argsort(order))
    return output.transpose(1, 2).contiguous()  # (B, Hq, Lq, Dv) -> (B, Lq, Hq, Dv)
