"""prepare() itself raises no warning at all: no deprecation from transformers, peft, torch or bitsandbytes because of
a call of ours, and nothing else. pyproject.toml ignores a few deprecations that peft triggers on its own (reading
`is_gradient_checkpointing` in get_peft_model); this test runs only our calls, with every warning an error."""

from __future__ import annotations

import warnings

import pytest
from conftest import bitsandbytes_supports
from peft import LoraConfig, get_peft_model

import portable_kbit
from portable_kbit.tools import tiny

TARGETS = tiny.LORA_TARGETS["llama"]


@pytest.mark.parametrize("activations", ["fp32", "native"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["base-model", "peft-model"])
@pytest.mark.parametrize("checkpointing", [None, {"use_reentrant": False}], ids=["default-kwargs", "non-reentrant"])
def test_prepare_warns_nothing(backend, device, activations, wrapped, checkpointing):
    if not bitsandbytes_supports(backend):
        pytest.skip(f"bitsandbytes 4-bit does not run on {backend}")
    model = tiny.load(tiny.checkpoint("llama"), "bnb-nf4", device)
    if wrapped:  # get_peft_model is the user's call (peft warns there on its own): outside the check
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        portable_kbit.prepare(
            model,
            device,
            target_modules=None if wrapped else TARGETS,
            activations=activations,
            gradient_checkpointing_kwargs=checkpointing,
        )
    assert [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught] == []
    assert portable_kbit.report(model) is not None


def test_a_model_without_quantized_weights_is_prepared_with_a_warning():
    """A half-precision model (no quantization_config) is prepared all the same, with one warning that says why it
    gains little, pointing at the caller's line."""
    model = tiny.load(tiny.checkpoint("llama"), "none", "cpu")
    with pytest.warns(portable_kbit.NoQuantizedWeightWarning, match="no quantized weight") as caught:
        portable_kbit.prepare(model, target_modules=TARGETS)
    assert len(caught) == 1 and caught[0].filename == __file__
    report = portable_kbit.report(model)
    assert report is not None and report.skipped_quantized == 0 and report.upcast_norms
