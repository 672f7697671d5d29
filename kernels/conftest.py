"""Kernel tests run through Triton's interpreter on the CPU unless told otherwise.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set here, before any
kernel module is imported (``personafuse.kernels`` itself imports Triton lazily for this reason).
Run with ``TRITON_INTERPRET=0`` on a GPU machine to test the compiled kernels, bf16 included.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"


@pytest.fixture
def device() -> str:
    if INTERPRET:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 needs a CUDA device")
    return "cuda"


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty``/``empty_like`` return NaN-filled floats, so any element a kernel forgets to write fails."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(empty_like(*a, **k)))
