"""Shared fixtures: a `backend` parametrised by the backends available here, tiny quantized models."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may load from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

import portable_kbit  # noqa: E402


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", portable_kbit.available_backends())


@pytest.fixture
def device(backend):
    """A torch device string for the backend under test ("cuda:0", "cpu" ...)."""
    return {"cuda": "cuda:0", "rocm": "cuda:0"}.get(backend, backend)


def bitsandbytes_supports(backend: str) -> bool:
    return backend in ("cuda", "rocm", "cpu")
