"""Protocols: runs that fine-tune or score a model over many conditions and report curves and effect sizes.

Each module is one paper's protocol (issue 15), run by ``attnlab protocol <name>``: ``retrieval`` (TempScale on
length-graded retrieval, METHODS.md #6), ``inflection_lora`` (diagnose, then LoRA at the inflection layers,
METHODS.md #5), ``memory`` (Orhan 2023, few-shot memories), ``data_quality`` ("LLMs Can Get Brain Rot").
This package sits at the tier of :mod:`attnlab.evaluation`: it may import capture, lab, edits, analyses and
evaluation, never cli, report or views.
"""
