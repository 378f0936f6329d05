"""Loop-based oracles for ``functional/``: written for reading, never optimised, float64-capable."""
