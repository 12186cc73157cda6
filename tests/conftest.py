"""Shared fixtures: a `backend` parametrised by the backends available here, tiny quantized models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may load from a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

import portable_kbit

# The test models are tiny: one intra-op CPU thread is as fast as two, and it does not spin-wait (OpenMP) when the
# 2-core machine is busy with anything else. Measured on a loaded 2-core machine: tests/test_matrix.py took 22 s with
# one thread, 267 s with two. Set PORTABLE_KBIT_TEST_THREADS to override.
torch.set_num_threads(int(os.environ.get("PORTABLE_KBIT_TEST_THREADS", "1")))


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", portable_kbit.available_backends())


@pytest.fixture
def device(backend):
    """A torch device string for the backend under test ("cuda:0", "cpu" ...)."""
    return {"cuda": "cuda:0", "rocm": "cuda:0"}.get(backend, backend)


def bitsandbytes_supports(backend: str) -> bool:
    return backend in ("cuda", "rocm", "cpu")


def planned_changes(model, upcast="adjacent", target_modules=None, frozen_norms="compute"):
    """The plan prepare() would build for these options, without changing the model."""
    import importlib

    prepare_module = importlib.import_module("portable_kbit.pipeline.prepare")
    return prepare_module.planned_changes(model, upcast, target_modules, frozen_norms)[0]


if os.environ.get("PORTABLE_KBIT_TEST_BLOCKING_OFF") == "1":
    # The mutation tests/test_blocks_without_blocking.py runs: token blocks planned and reported as before, but every
    # call runs the plain path (a block size no call reaches). The tests of tests/test_blocks.py must notice.
    import dataclasses

    from portable_kbit.patches.token_blocks import plan as _blocks_plan

    _patches = _blocks_plan.patches
    _blocks_plan.patches = lambda model, plan, counts: _patches(
        model, dataclasses.replace(plan, size=1 << 40, mlp_size=1 << 40), counts
    )
