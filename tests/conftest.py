"""Shared test setup: hypothesis profiles, tiny random models, and a NaN-poisoned allocator for attnlab code."""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def _called_from_attnlab() -> bool:
    frame = inspect.currentframe()
    try:
        frame = frame.f_back.f_back if frame and frame.f_back else None
        return bool(frame and frame.f_globals.get("__name__", "").startswith("attnlab"))
    finally:
        del frame


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Uninitialised memory allocated by attnlab is NaN-filled, so any read of it shows up (fla's trick)."""
    real_new_empty = torch.Tensor.new_empty
    real_empty = torch.empty

    def new_empty(self, *args, **kwargs):
        out = real_new_empty(self, *args, **kwargs)
        if out.is_floating_point() and _called_from_attnlab():
            out.fill_(float("nan"))
        return out

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point() and _called_from_attnlab():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    monkeypatch.setattr(torch, "empty", empty)
    yield


@pytest.fixture
def llama():
    from tiny_models import tiny_llama

    return tiny_llama()
