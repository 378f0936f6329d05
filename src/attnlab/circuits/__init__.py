"""Circuits: activation patching and path patching of attention heads (Merullo et al. 2024, METHODS.md #18;
Wang et al. 2022), on any model attnlab's backend runs. Tier of :mod:`attnlab.evaluation`."""
