"""patch_peft(): a script written the usual way (nf4, peft's prepare_model_for_kbit_training, get_peft_model, Trainer)
gets portable_kbit.prepare without an edit; undo() gives peft back exactly; the environment switch and the run wrapper
do it for code nobody edits.

In-process, the usual script calls peft's function through tests/peft_baseline.py's `prepare_with_peft`, which looks
up `peft.prepare_model_for_kbit_training` at call time (the patched function while the patch is active) and filters
only peft's own deprecation warning. The subprocess scripts import it the usual way.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import runpy
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import bitsandbytes_supports
from peft import LoraConfig, get_peft_model
from peft_baseline import prepare_with_peft
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

import portable_kbit
from portable_kbit.pipeline import patch_peft as patch
from portable_kbit.pipeline.patch_peft import PeftArgumentWarning, patch_peft
from portable_kbit.tools import run_patched as run
from portable_kbit.tools import tiny

ROOT = Path(__file__).resolve().parents[1]
TARGETS = tiny.LORA_TARGETS["llama"]
PEFT_FUNCTION = peft.prepare_model_for_kbit_training  # peft's own, bound at import (before any patch)


@pytest.fixture(autouse=True)
def unpatched():
    """Each test starts with peft as peft ships it and leaves it so, whatever the test did."""
    assert patch.active_patch() is None and peft.prepare_model_for_kbit_training is PEFT_FUNCTION
    yield
    active = patch.active_patch()
    if active is not None:
        active.undo()
    assert peft_bindings() == original_bindings()


def peft_modules() -> list[types.ModuleType]:
    return [m for n, m in list(sys.modules.items()) if isinstance(m, types.ModuleType) and n.split(".")[0] == "peft"]


def peft_bindings() -> dict[tuple[str, str], Any]:
    """Every module attribute under peft that is, or wraps, peft's function: (module, name) -> the object."""
    out = {}
    for module in peft_modules():
        for name, value in list(vars(module).items()):
            if value is PEFT_FUNCTION or getattr(value, "__wrapped__", None) is PEFT_FUNCTION:
                out[(module.__name__, name)] = value
    return out


def original_bindings() -> dict[tuple[str, str], Any]:
    return dict.fromkeys(peft_bindings(), PEFT_FUNCTION)


def load_nf4(device: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(
        tiny.checkpoint("llama"),
        dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        device_map={"": device},
    )


def usual_script(device: str, output_dir: Path) -> tuple[Any, Trainer]:
    """A QLoRA script written the usual way: load nf4, peft's function, get_peft_model, Trainer for 2 steps."""
    model = load_nf4(device)
    model = prepare_with_peft(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row} for row in ids.tolist()]
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return model, trainer


def dtypes(model: Any) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters()}


def weight_dtype(module: Any) -> torch.dtype:
    return module.weight.dtype


def needs_bitsandbytes(backend: str) -> None:
    if not bitsandbytes_supports(backend):
        pytest.skip(f"bitsandbytes 4-bit does not run on {backend}")


def test_the_usual_script_trains_with_portable_kbit_and_undo_gives_peft_back(backend, device, tmp_path):
    needs_bitsandbytes(backend)
    control, _ = usual_script(device, tmp_path / "control")  # unpatched peft
    assert weight_dtype(control.get_input_embeddings()) == torch.float32  # peft's fp32 copies, the ones we avoid
    assert portable_kbit.report(control) is None

    handle = patch_peft()
    model, trainer = usual_script(device, tmp_path / "patched")
    handle.undo()

    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: the steps changed it

    report = portable_kbit.report(model)
    assert report is not None and report.policy == "adjacent" and report.gradient_checkpointing
    assert report.upcast_norms and any("patch_peft" in note for note in report.notes)
    assert weight_dtype(model.get_input_embeddings()) == torch.bfloat16  # no fp32 copy of the embedding
    assert weight_dtype(model.get_output_embeddings()) == torch.bfloat16  # nor of lm_head
    frozen_fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32 and not p.requires_grad}
    upcast = {f"base_model.model.{name}" for name in report.upcast}
    assert frozen_fp32 == upcast and all(".".join(n.split(".")[2:-1]) in report.upcast_norms for n in upcast)

    again, _ = usual_script(device, tmp_path / "undone")  # after undo(): peft's own function, peft's dtypes
    assert dtypes(again) == dtypes(control) != dtypes(model)
    assert portable_kbit.report(again) is None


def test_undo_restores_every_name_under_peft():
    before = peft_bindings()
    assert len(before) >= 3  # peft, peft.utils, peft.utils.other
    handle = patch_peft()
    assert handle.original is PEFT_FUNCTION and handle.active
    assert peft_bindings() == dict.fromkeys(before, handle.wrapper)
    assert sorted((m.__name__, n) for m, n in handle.rebound) == sorted(before)
    handle.undo()
    assert peft_bindings() == before and not handle.active
    handle.undo()  # idempotent
    assert peft_bindings() == before


def test_the_wrapper_keeps_pefts_signature():
    # TRL (0.19 trainers, 1.x experimental ORPO/CPO) checks the signature for gradient_checkpointing_kwargs
    with patch_peft() as handle:
        wrapped = peft.prepare_model_for_kbit_training
        assert wrapped is handle.wrapper and wrapped.__wrapped__ is PEFT_FUNCTION
        assert inspect.signature(wrapped) == inspect.signature(PEFT_FUNCTION)
        assert "gradient_checkpointing_kwargs" in inspect.signature(wrapped).parameters


def test_a_second_call_does_not_stack_it_updates_the_defaults():
    first = patch_peft()
    second = patch_peft(activations="native")
    assert second is first
    assert peft.prepare_model_for_kbit_training is first.wrapper and first.wrapper.__wrapped__ is PEFT_FUNCTION
    assert first.defaults == {"activations": "native"}
    model = peft.prepare_model_for_kbit_training(tiny.load(tiny.checkpoint("llama"), "bnb-nf4", "cpu"))
    assert portable_kbit.report(model).activations == "native"
    first.undo()  # one undo, however many calls
    assert peft_bindings() == original_bindings()


def test_context_manager_and_nested_blocks():
    with patch_peft() as outer:
        assert peft.prepare_model_for_kbit_training is outer.wrapper and outer.defaults == {}
        with patch_peft(activations="native", upcast="norms") as inner:
            assert inner is outer and outer.defaults == {"activations": "native", "upcast": "norms"}
        assert outer.active and outer.defaults == {}  # leaving the inner block undid only the inner call
        assert peft.prepare_model_for_kbit_training is outer.wrapper
    assert not outer.active and peft_bindings() == original_bindings()


def test_the_calls_own_arguments_win_over_the_defaults():
    with patch_peft(use_gradient_checkpointing=False, activations="native"):
        model = peft.prepare_model_for_kbit_training(tiny.load(tiny.checkpoint("llama"), "bnb-nf4", "cpu"), True)
        report = portable_kbit.report(model)
        assert report.gradient_checkpointing and report.activations == "native"
        other = peft.prepare_model_for_kbit_training(tiny.load(tiny.checkpoint("llama"), "bnb-nf4", "cpu"))
        assert not portable_kbit.report(other).gradient_checkpointing  # the default, where the call passes none


@pytest.mark.parametrize(
    ("defaults", "error", "message"),
    [
        ({"activation": "native"}, TypeError, "'activation'.*did you mean 'activations'"),
        ({"auto_clear_cache": False}, TypeError, "not an option of portable_kbit.prepare"),
        ({"model": None}, TypeError, "the model is what each call"),
        ({"activations": "bf16"}, ValueError, "activations='bf16'"),
        ({"upcast": "all"}, ValueError, "upcast='all'"),
        ({"chunk_bytes": 0}, ValueError, "chunk_bytes=0"),
        ({"device": "gpu"}, ValueError, "unknown device 'gpu'"),
        ({"device": True}, TypeError, "use_gradient_checkpointing"),
        ({"use_gradient_checkpointing": "yes"}, TypeError, "True or False"),
        ({"gradient_checkpointing_kwargs": [("use_reentrant", False)]}, TypeError, "must be a dict"),
    ],
)
def test_bad_defaults_fail_before_anything_is_patched(defaults, error, message):
    with pytest.raises(error, match=message):
        patch_peft(**defaults)
    assert patch.active_patch() is None and peft_bindings() == original_bindings()


@pytest.mark.skipif(
    "auto_clear_cache" not in inspect.signature(PEFT_FUNCTION).parameters, reason="this peft has no auto_clear_cache"
)
def test_auto_clear_cache_false_means_nothing_here_and_says_so():
    with patch_peft():
        with pytest.warns(PeftArgumentWarning, match=r"auto_clear_cache=False.*ignored") as caught:
            model = peft.prepare_model_for_kbit_training(
                tiny.load(tiny.checkpoint("llama"), "bnb-nf4", "cpu"), auto_clear_cache=False
            )
        assert caught[0].filename == __file__  # points at the caller's line
        assert portable_kbit.report(model) is not None
        with warnings.catch_warnings(record=True) as quiet:
            warnings.simplefilter("always")
            peft.prepare_model_for_kbit_training(
                tiny.load(tiny.checkpoint("llama"), "bnb-nf4", "cpu"), True, None, True
            )
        assert not [w for w in quiet if issubclass(w.category, PeftArgumentWarning)]  # True is what prepare() does


@pytest.fixture
def fake_peft_function(monkeypatch):
    """peft's function replaced, in every module under peft, by a stand-in from a newer peft with one more keyword."""
    calls = []

    def prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs=None, low_memory_mode=False
    ):
        calls.append(model)
        return model

    for module, name in patch._names_bound_to(PEFT_FUNCTION, peft_modules()):
        monkeypatch.setattr(module, name, prepare_model_for_kbit_training)
    return prepare_model_for_kbit_training, calls


def test_a_keyword_from_a_newer_peft_is_warned_about_never_dropped(fake_peft_function):
    fake, _ = fake_peft_function
    with patch_peft() as handle:
        assert handle.original is fake
        with pytest.warns(PeftArgumentWarning, match=r"low_memory_mode=True.*no counterpart"):
            model = peft.prepare_model_for_kbit_training(
                tiny.load(tiny.checkpoint("llama"), "bnb-nf4", "cpu"), low_memory_mode=True
            )
        assert portable_kbit.report(model) is not None
        with pytest.raises(TypeError, match="no_such_keyword"):  # what peft's own function would refuse
            peft.prepare_model_for_kbit_training(model, no_such_keyword=1)


def test_a_wrapper_kept_after_undo_calls_pefts_function(fake_peft_function):
    fake, calls = fake_peft_function
    handle = patch_peft()
    kept = peft.prepare_model_for_kbit_training
    handle.undo()
    assert peft.prepare_model_for_kbit_training is fake
    sentinel = object()
    assert kept(sentinel) is sentinel and calls == [sentinel]


def test_a_name_rebound_by_someone_else_is_left_alone_with_a_warning():
    handle = patch_peft()
    other = object()
    peft.prepare_model_for_kbit_training = other
    try:
        with pytest.warns(RuntimeWarning, match="rebound"):
            handle.undo()
        assert peft.prepare_model_for_kbit_training is other
        assert peft.utils.prepare_model_for_kbit_training is PEFT_FUNCTION
    finally:
        peft.prepare_model_for_kbit_training = PEFT_FUNCTION


def framework_module(name: str, monkeypatch) -> types.ModuleType:
    """A module that did `from peft import prepare_model_for_kbit_training` at import, as frameworks do."""
    module = types.ModuleType(name)
    exec("from peft import prepare_model_for_kbit_training", module.__dict__)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_a_module_bound_before_the_patch_keeps_peft_unless_rebind_everywhere(monkeypatch):
    before = framework_module("framework_before_the_patch", monkeypatch)
    with patch_peft() as handle:
        assert before.prepare_model_for_kbit_training is PEFT_FUNCTION  # bound before: not patched
        after = framework_module("framework_after_the_patch", monkeypatch)
        assert after.prepare_model_for_kbit_training is handle.wrapper  # imported after: patched
    assert after.prepare_model_for_kbit_training is PEFT_FUNCTION  # undo finds it too

    with patch_peft(rebind_everywhere=True) as handle:
        assert before.prepare_model_for_kbit_training is handle.wrapper
        assert (before, "prepare_model_for_kbit_training") in handle.rebound
    assert before.prepare_model_for_kbit_training is PEFT_FUNCTION

    with patch_peft() as handle:  # a later call with rebind_everywhere; leaving its block unbinds only its names
        with patch_peft(rebind_everywhere=True):
            assert before.prepare_model_for_kbit_training is handle.wrapper
        assert before.prepare_model_for_kbit_training is PEFT_FUNCTION
        assert peft.prepare_model_for_kbit_training is handle.wrapper


def test_the_environment_switch_is_parsed_strictly():
    assert patch.apply_environment_switch({}) is None
    for value in ("0", "false", "No", "off", ""):
        assert patch.apply_environment_switch({patch.ENV_SWITCH: value}) is None
    assert patch.active_patch() is None
    for value in ("1", "true", " YES ", "on"):
        handle = patch.apply_environment_switch({patch.ENV_SWITCH: value})
        assert handle is not None and handle.active
        handle.undo()
    for value in ("2", "native", "enabled"):
        with pytest.raises(ValueError, match=f"PORTABLE_KBIT_PATCH_PEFT={value!r} is not understood"):
            patch.apply_environment_switch({patch.ENV_SWITCH: value})
    assert patch.active_patch() is None


def python(code_or_args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != patch.ENV_SWITCH}
    # the test's own entries first, then the repository, then what this process was given (where packages installed
    # outside site-packages live, as on the GPU machine)
    inherited = os.environ.get("PYTHONPATH", "")
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (env.pop("PYTHONPATH", ""), str(ROOT), inherited) if p)
    environ.update(env)
    return subprocess.run(
        [sys.executable, *code_or_args], cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=300
    )


def test_import_portable_kbit_imports_no_peft_when_the_switch_is_off(tmp_path):
    code = "import sys, portable_kbit; print(sorted(m for m in sys.modules if m.split('.')[0] == 'peft'))"
    done = python(["-c", code], tmp_path, PORTABLE_KBIT_PATCH_PEFT="0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


REPORT_LINE = """
import json, portable_kbit
report = portable_kbit.report(model)
print(json.dumps({
    "notes": report.notes if report else None,
    "activations": report.activations if report else None,
    "embedding": str(model.get_input_embeddings().weight.dtype),
    "head": str(model.get_output_embeddings().weight.dtype),
}))
"""


def test_the_environment_switch_patches_at_import_from_sitecustomize(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import portable_kbit\n")  # the one line a user adds
    script = (
        "import sys\nfrom peft import prepare_model_for_kbit_training\nfrom portable_kbit import tiny\n"
        "model = prepare_model_for_kbit_training(tiny.load(sys.argv[1], 'bnb-nf4', 'cpu'))\n" + REPORT_LINE
    )
    done = python(
        ["-c", script, tiny.checkpoint("llama")], tmp_path, PORTABLE_KBIT_PATCH_PEFT="1", PYTHONPATH=str(site)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert any("patch_peft" in note for note in result["notes"])
    assert result["embedding"] == result["head"] == "torch.bfloat16"

    bad = python(["-c", "import portable_kbit"], tmp_path, PORTABLE_KBIT_PATCH_PEFT="maybe")
    assert bad.returncode != 0 and "PORTABLE_KBIT_PATCH_PEFT='maybe' is not understood" in bad.stderr


USUAL_SCRIPT_FILE = """
import json, sys
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

model_path, output_dir = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(
    model_path,
    dtype=torch.bfloat16,
    quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    ),
    device_map={"": "cpu"},
)
model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
args = TrainingArguments(
    output_dir=output_dir, max_steps=2, per_device_train_batch_size=2, save_strategy="no", report_to="none",
    use_cpu=True, disable_tqdm=True,
)
trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids.tolist()])
trainer.train()
print("argv", json.dumps(sys.argv), __name__, trainer.state.global_step)
"""


def test_the_run_wrapper_runs_an_unedited_script_with_the_patch(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(USUAL_SCRIPT_FILE + REPORT_LINE)
    argv = [str(script), tiny.checkpoint("llama"), str(tmp_path / "out")]
    done = python(["-m", "portable_kbit.run", "--activations", "native", *argv], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert f"argv {json.dumps(argv)} __main__ 2" in lines
    result = json.loads(lines[-1])
    assert result["activations"] == "native" and any("patch_peft" in note for note in result["notes"])
    assert result["embedding"] == result["head"] == "torch.bfloat16"


def test_the_run_wrapper_runs_a_module_and_refuses_a_missing_script(tmp_path, monkeypatch):
    (tmp_path / "framework_cli.py").write_text(
        "import sys, peft\nRESULT = (__name__, list(sys.argv), peft.prepare_model_for_kbit_training)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    real_run_module, seen = runpy.run_module, {}

    def run_module(name: str, **kwargs: Any) -> dict[str, Any]:
        seen.update(real_run_module(name, **kwargs))  # the module's globals once it has run
        return seen

    monkeypatch.setattr(runpy, "run_module", run_module)
    run.main(["--upcast", "norms", "-m", "framework_cli", "train", "--lr", "1"])
    name, argv, function = seen["RESULT"]
    handle = patch.active_patch()
    assert name == "__main__" and argv[1:] == ["train", "--lr", "1"]
    assert handle is not None and function is handle.wrapper and handle.defaults == {"upcast": "norms"}
    handle.undo()

    with pytest.raises(SystemExit, match="no such file"):
        run.main([str(tmp_path / "missing.py")])
    assert patch.active_patch() is None
