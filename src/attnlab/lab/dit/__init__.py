"""A small diffusion-transformer lab trained here: synthetic scenes and videos, tiny diffusers transformers
(PixArt for images, Wan for videos) trained by rectified flow, a guided Euler sampler, evaluation.

Modules: :mod:`~attnlab.lab.dit.scenes` (PIL-drawn shapes with captions and masks; moving shapes),
:mod:`~attnlab.lab.dit.model` (spec, word embedding, transformers), :mod:`~attnlab.lab.dit.pipeline` (encoding,
sampler, folder format), :mod:`~attnlab.lab.dit.train` and :mod:`~attnlab.lab.dit.evaluate`. CLI:
``attnlab dit train|sample|eval``; docs/dit_lab.md.
"""
