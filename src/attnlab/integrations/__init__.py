"""Integrations with other evaluation tools. Tier of :mod:`attnlab.evaluation` (may import capture, edits and
evaluation; never cli or views).

- :mod:`attnlab.integrations.lm_eval`: attnlab models with edits as the lm-evaluation-harness model ``attnlab``
  (docs/lm_eval.md). Needs the ``lm-eval`` extra; importing this package imports nothing heavy.
"""
