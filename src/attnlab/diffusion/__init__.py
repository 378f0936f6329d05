"""attnlab inside diffusers models: the session, the token layout of patches and text, and the methods of the
diffusion-transformer papers (docs/diffusion.md)."""

from attnlab.diffusion.session import DiffusionSession, attention_modules, is_diffusers_model

__all__ = ["DiffusionSession", "attention_modules", "is_diffusers_model"]
