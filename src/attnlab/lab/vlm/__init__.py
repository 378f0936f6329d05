"""A small vision-language model trained here: synthetic scenes, questions, a tiny LLaVA, training, evaluation.

Modules: :mod:`~attnlab.lab.vlm.scenes` (PIL-drawn shapes on a grid), :mod:`~attnlab.lab.vlm.questions`
(presence / colour / count / position with exact one-word answers), :mod:`~attnlab.lab.vlm.model` (a
transformers LlavaForConditionalGeneration + LlavaProcessor from configs), :mod:`~attnlab.lab.vlm.data` (batches,
CCA inputs), :mod:`~attnlab.lab.vlm.train` and :mod:`~attnlab.lab.vlm.evaluate`. CLI: ``attnlab vlm train|eval``;
docs/vlm_lab.md.
"""
