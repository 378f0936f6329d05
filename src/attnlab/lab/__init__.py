"""The lab: small models built from attnlab's layers (TinyLM), seeded tasks, training and sweeps.

Tier: above ``layers/``, ``functional/`` and ``capture/``; below ``config``/``pipeline``/``cli``. The model is a
transformers ``PreTrainedModel``, so a saved checkpoint loads with :func:`attnlab.load_model` and every command
(``report``, ``probe``, ``eval``) works on it.
"""
