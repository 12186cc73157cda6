"""Model shapes built locally with random bf16 weights (no download), and where they are cached.

Shared by ``compare`` (the phase-by-phase comparison), ``fit`` (the forecast command) and the benchmark scripts.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from .. import backends
from ..constants import MiB
from ..memory import snapshots
from . import tiny
from .quiet import keeping


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model shape built locally with random bf16 weights (no download)."""

    name: str
    description: str
    config: Callable[[], Any]
    seq_len: int
    steps: int
    approx_bytes: int  # of the saved bf16 checkpoint

    @property
    def build_in_subprocess(self) -> bool:
        # A big build would leave its memory in the parent while the variants run.
        return self.approx_bytes > 1 << 30


def _tiny_config() -> Any:
    return tiny.config_for("llama")


def _small_config() -> Any:
    import transformers

    return transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def rope_theta_kwargs(theta: float) -> dict[str, Any]:
    """A config's rope base: ``rope_parameters`` from transformers 5, ``rope_theta`` before (4.x)."""
    import inspect

    import transformers

    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


def _mistral_7b_config() -> Any:
    import transformers

    return transformers.MistralConfig(
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        sliding_window=None,
        tie_word_embeddings=False,
        **rope_theta_kwargs(1000000.0),
    )


def llama3_rope_kwargs() -> dict[str, Any]:
    """Llama 3.1's rope: base 500000 with the llama3 scaling (factor 8 over 8192 original positions), as
    ``rope_parameters`` from transformers 5 and ``rope_theta`` / ``rope_scaling`` before."""
    import inspect

    import transformers

    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if "rope_parameters" in inspect.signature(transformers.LlamaConfig.__init__).parameters:
        return {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}}
    return {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}


def _llama_31_8b_config() -> Any:
    import transformers

    return transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=128001,
        tie_word_embeddings=False,
        **llama3_rope_kwargs(),
    )


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        "the tiny Llama of portable_kbit.tools.tiny (hidden 128, 2 layers, vocab 256): seconds on a CPU",
        _tiny_config,
        seq_len=32,
        steps=3,
        approx_bytes=700 << 10,
    ),
    "small": Preset(
        "small",
        "a Llama shape of about 155M parameters (hidden 1024, 8 layers, vocab 32000), ~310 MB",
        _small_config,
        seq_len=256,
        steps=5,
        approx_bytes=310 * MiB,
    ),
    "mistral-7b": Preset(
        "mistral-7b",
        "the Mistral-7B-v0.3 shape (vocab 32768, hidden 4096, MLP 14336, 32 layers, "
        "32 heads, 8 KV heads, untied head), ~14.5 GB",
        _mistral_7b_config,
        seq_len=512,
        steps=5,
        approx_bytes=14_500 * MiB,
    ),
    "llama-3.1-8b": Preset(
        "llama-3.1-8b",
        "the Llama-3.1-8B shape (vocab 128256, hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV heads, untied "
        "head, llama3 rope scaling to 131072 positions), ~15.3 GB",
        _llama_31_8b_config,
        seq_len=512,
        steps=5,
        approx_bytes=15_320 * MiB,
    ),
}


def default_cache_dir() -> str:
    """Where presets are saved: $PORTABLE_KBIT_CACHE, else ~/.cache/portable_kbit."""
    return os.environ.get("PORTABLE_KBIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "portable_kbit")


def preset_path(name: str, cache_dir: str | None = None) -> str:
    """The folder a preset is (or will be) saved in."""
    return os.path.join(cache_dir or default_cache_dir(), "presets", name)


def build_preset(name: str, cache_dir: str | None = None, seed: int = 0, device: str | None = None) -> str:
    """Save the preset's random bf16 checkpoint once (a complete folder or none: written aside, then renamed).

    With `device` (an accelerator with room for the whole model), the random weights are made there, which is much
    faster than on a CPU for a 7B shape; they are saved the same way.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    path = preset_path(name, cache_dir)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from transformers import AutoModelForCausalLM

    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.manual_seed(seed)
    where = torch.device("cpu")
    if device is not None:
        target = backends.resolve(device)
        headroom = snapshots.take(target).headroom
        if headroom is not None and headroom > 1.25 * PRESETS[name].approx_bytes:
            where = target.device
    with where:
        model = AutoModelForCausalLM.from_config(PRESETS[name].config(), dtype=torch.bfloat16)
    staging = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(path))
    try:
        model.save_pretrained(staging)
        os.chmod(staging, 0o755)  # mkdtemp made it private
        os.replace(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isfile(os.path.join(path, "config.json")):  # not a concurrent builder winning the race
            raise
    return path


def materialize(path_or_preset: str, cache_dir: str | None = None, device: str | None = None) -> str:
    """A local checkpoint folder as is, or a preset's folder (built on first use; a big one in a subprocess, on
    `device` where it fits)."""
    if os.path.isdir(path_or_preset):
        return path_or_preset
    if path_or_preset not in PRESETS:
        raise ValueError(
            f"{path_or_preset!r} is neither a local checkpoint folder nor a preset ({', '.join(PRESETS)})"
        )
    preset = PRESETS[path_or_preset]
    path = preset_path(preset.name, cache_dir)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if not preset.build_in_subprocess:
        return build_preset(preset.name, cache_dir)
    command = [sys.executable, "-m", "portable_kbit", "compare", preset.name, "--build-preset"]
    if device is not None:
        command += ["--device", device]
    if cache_dir:
        command += ["--cache-dir", cache_dir]
    if keeping():  # --verbose: the child keeps the libraries' output too
        command.append("--verbose")
    subprocess.run(command, check=True, env=child_env())
    return path


def lora_targets(checkpoint_path: str) -> list[str] | None:
    """The attention projections for the checkpoint's model_type (None: peft's defaults for it)."""
    try:
        with open(os.path.join(checkpoint_path, "config.json")) as handle:
            model_type = json.load(handle).get("model_type")
    except (OSError, ValueError):
        return None
    targets = tiny.LORA_TARGETS.get(model_type)
    return list(targets) if targets else None


def versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the numbers (None: not installed)."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in (
        "portable-kbit",
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "optimum-quanto",
        "accelerate",
        "psutil",
    ):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch"] = torch.__version__
    return out


def child_env() -> dict[str, str]:
    """The environment for a fresh Python process that imports this portable_kbit (a source checkout too)."""
    env = dict(os.environ)
    import portable_kbit

    # the folder that holds the package: a child process finds this checkout too, not only an installed copy
    root = os.path.dirname(os.path.dirname(os.path.abspath(portable_kbit.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env
