"""MemoryMonitor with a real transformers Trainer on CPU, by hand in a plain loop; its warning and release rules."""

from __future__ import annotations

import collections
import warnings

import psutil
import pytest
import torch

import portable_kbit
from portable_kbit import backends
from portable_kbit.backends.base import AllocatorStats, Backend
from portable_kbit.constants import MiB
from portable_kbit.memory.monitor import LowMemoryWarning, MemoryMonitor
from portable_kbit.tools import tiny

GiB = 1 << 30
TARGETS = tiny.LORA_TARGETS["llama"]


def lora_model(quantizer: str = "bnb-nf4"):
    from peft import LoraConfig, get_peft_model

    model = tiny.load(tiny.checkpoint("llama"), quantizer, "cpu")
    model = portable_kbit.prepare(
        model, "cpu", target_modules=TARGETS, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))


def token_rows(count: int = 8, length: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(0, 256, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def test_exported_lazily_from_the_package():
    assert portable_kbit.MemoryMonitor is MemoryMonitor
    assert "MemoryMonitor" in portable_kbit.__all__
    from transformers import TrainerCallback

    assert isinstance(MemoryMonitor(), TrainerCallback)


def test_with_a_real_trainer_records_snapshots_and_logs_memory(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    seen_logs: list[dict] = []

    class Recorder(TrainerCallback):  # stands for a reporting integration: it runs before user callbacks
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen_logs.append(dict(logs or {}))

    monitor = MemoryMonitor(every_n_steps=1)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=lora_model(), args=args, train_dataset=token_rows(), callbacks=[Recorder(), monitor])
    monitor.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is monitor
    trainer.train()

    assert monitor.steps == [1, 2, 3]
    assert len(monitor.snapshots) == 3
    assert all(s.backend == "cpu" and s.host_available > 0 and s.process_rss > 0 for s in monitor.snapshots)
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 3
    for entry in train_logs:
        assert entry["memory/host_available_mib"] > 0 and entry["memory/process_rss_mib"] > 0
        assert "memory/allocated_mib" not in entry  # a CPU has no allocator numbers: left out, not logged as None
    assert [log for log in seen_logs if "loss" in log and "memory/process_rss_mib" in log]
    assert monitor.releases == []  # release_under_pressure is off by default


def test_in_a_plain_loop_snapshots_every_n_steps():
    model = lora_model()
    monitor = MemoryMonitor(every_n_steps=2).watch(model)
    assert monitor.target.backend.name == "cpu"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = tiny.batch(length=16)
    model.train()
    taken = []
    for _ in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        taken.append(monitor.step())
    assert [s is not None for s in taken] == [False, True, False, True]
    assert monitor.steps == [2, 4] and monitor.snapshots[-1] is taken[-1]
    assert set(monitor.log_values()) == {"memory/host_available_mib", "memory/process_rss_mib"}


def fake_virtual_memory(monkeypatch, available: int, total: int = 16 * GiB) -> None:
    real = psutil.virtual_memory()
    Memory = collections.namedtuple("Memory", ["total", "available", "percent", "used", "free"])
    monkeypatch.setattr(
        psutil,
        "virtual_memory",
        lambda: Memory(total, available, 100 * (1 - available / total), total - available, real.free),
    )


def test_low_unified_memory_warns_exactly_once(monkeypatch):
    monitor = MemoryMonitor(every_n_steps=1, device="cpu", warn_below_fraction=0.1)
    fake_virtual_memory(monkeypatch, available=int(0.5 * GiB))  # 3% of 16 GiB
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            monitor.step()
    low = [w for w in caught if issubclass(w.category, LowMemoryWarning)]
    assert len(low) == 1 and monitor.warned
    assert "unified memory is low" in str(low[0].message) and "512 MiB available of 16384 MiB" in str(low[0].message)


def test_no_warning_with_enough_memory_or_when_disabled(monkeypatch):
    fake_virtual_memory(monkeypatch, available=8 * GiB)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MemoryMonitor(every_n_steps=1, device="cpu").step()
    assert not [w for w in caught if issubclass(w.category, LowMemoryWarning)]
    fake_virtual_memory(monkeypatch, available=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MemoryMonitor(every_n_steps=1, device="cpu", warn_below_fraction=None).step()
    assert not [w for w in caught if issubclass(w.category, LowMemoryWarning)]


class StandInBackend(Backend):
    """A device whose allocator reports what the test says, and that counts releases."""

    name = "cpu"
    device_type = "cpu"

    def __init__(self, allocated: int, reserved: int, unified: bool, device_free=None, device_total=None):
        self.stats = AllocatorStats(
            allocated=allocated, reserved=reserved, device_free=device_free, device_total=device_total
        )
        self.unified = unified
        self.released = 0

    def is_unified(self, device):
        return self.unified

    def allocator_stats(self, device):
        return self.stats

    def release(self, device):
        self.released += 1


@pytest.mark.parametrize(
    "cached_mib, available_fraction, expected",
    [
        (512, 0.20, True),  # the edge of both conditions: release
        (2048, 0.05, True),
        (511, 0.05, False),  # too little cached to be worth it
        (2048, 0.21, False),  # enough memory available
        (0, 0.01, False),
    ],
)
def test_release_rule_on_unified_memory_is_vllms(monkeypatch, cached_mib, available_fraction, expected):
    total = 16 * GiB
    stand_in = StandInBackend(allocated=3 * GiB, reserved=3 * GiB + cached_mib * MiB, unified=True)
    monkeypatch.setitem(backends._instances, "cpu", stand_in)
    fake_virtual_memory(monkeypatch, available=int(available_fraction * total), total=total)
    monitor = MemoryMonitor(every_n_steps=1, device="cpu", release_under_pressure=True, warn_below_fraction=None)
    monitor.step()
    monitor.step()
    assert stand_in.released == (2 if expected else 0)
    assert monitor.releases == ([1, 2] if expected else [])
    assert MemoryMonitor.under_pressure(monitor.snapshots[-1]) is expected


def test_release_rule_on_a_discrete_gpu_uses_device_free(monkeypatch):
    fake_virtual_memory(monkeypatch, available=1 * MiB)  # the host is irrelevant on discrete memory
    roomy = StandInBackend(allocated=GiB, reserved=3 * GiB, unified=False, device_free=30 * GiB, device_total=80 * GiB)
    tight = StandInBackend(allocated=GiB, reserved=3 * GiB, unified=False, device_free=8 * GiB, device_total=80 * GiB)
    for stand_in, expected in ((roomy, 0), (tight, 1)):
        monkeypatch.setitem(backends._instances, "cpu", stand_in)
        MemoryMonitor(every_n_steps=1, device="cpu", release_under_pressure=True).step()
        assert stand_in.released == expected


def test_never_releases_unless_asked(monkeypatch):
    stand_in = StandInBackend(allocated=GiB, reserved=4 * GiB, unified=True)
    monkeypatch.setitem(backends._instances, "cpu", stand_in)
    fake_virtual_memory(monkeypatch, available=GiB)
    monitor = MemoryMonitor(every_n_steps=1, device="cpu", warn_below_fraction=None)
    monitor.step()
    assert stand_in.released == 0 and MemoryMonitor.under_pressure(monitor.snapshots[0])


@pytest.mark.parametrize("kwargs", [{"every_n_steps": 0}, {"every_n_steps": 1.5}, {"warn_below_fraction": 2}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        MemoryMonitor(**kwargs)


def test_with_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (optional: pip install trl)")
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (TRL needs it)")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(200)]
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{word: i + 3 for i, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )
    texts = [" ".join(words[(7 * i + j) % 200] for j in range(12)) for i in range(8)]
    monitor = MemoryMonitor(every_n_steps=1)
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=2,
        save_strategy="no",
        disable_tqdm=True,
        max_length=32,
    )
    trainer = trl.SFTTrainer(
        model=lora_model(),
        args=config,
        processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        callbacks=[monitor],
    )
    trainer.train()
    assert monitor.steps == [1, 2]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all("memory/process_rss_mib" in entry for entry in logged)
