"""Every causal LM that transformers ships, through prepare(): trained, refused with a reason, or a failure.

For each model type in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: a tiny random config (the usual size
fields shrunk, nested text/vision/audio configs too), saved and loaded back with bitsandbytes nf4 on the CPU; a
control (LoRA on the bare quantized model, no prepare(): peft's default targets for the model type, else
all-linear, 2 AdamW steps), then ``prepare()`` in each activations mode with the same LoRA and 2 AdamW steps.

Outcome per type and mode:
- ``trained``: finite losses, finite adapter gradients, every adapter that gets a gradient in the control gets one
  here (experts excepted: routing may differ), no quantized weight changed, only the planned parameters changed dtype;
- ``refused``: prepare() raised a clear error before any change (the model state compared in full, as
  tests/model_state.py does); the reason is recorded, and where it names a way forward that the sweep can take
  (``use_gradient_checkpointing=False``) the retry's outcome too;
- ``control-failed``: LoRA training fails without prepare() too (not ours; the error is recorded);
- ``config-failed``: no tiny model could be built, saved and loaded (the reason is recorded);
- ``failed``: anything else, with the stage and the error.

Two more modes, ``fp32+blocks`` and ``native+blocks``, prepare with ``token_blocks=8`` (the sweep's sequences are
32 tokens: four blocks); a refusal of that size (a head and loss that cannot run in blocks) is retried with
``token_blocks="auto"``, whose block size the sweep sets to 8 tokens too. ``trained`` there also means that what
prepare() planned in blocks ran in blocks (``report(model).token_block_calls``). And for every type, ``trace``: the
trace prepare() runs (with token blocks) leaves the model exactly as it was (the model state compared in full, no
tensor on the meta device).

Each type runs in its own subprocess with a timeout (one bad model does not stop the sweep):

    python benchmarks/architectures.py                       # the full sweep -> benchmarks/results/architectures/
    python benchmarks/architectures.py --types gpt_oss,llama # a sample (its records replace those types' records)
    python benchmarks/architectures.py --table               # the summary table from the committed results
    python benchmarks/architectures.py --write docs/architectures.md   # ... written between the page's table markers

--write PATH replaces what stands between the markers ``<!-- architectures-table:start -->`` and
``<!-- architectures-table:end -->`` in any markdown file (--readme PATH is its old name, still accepted).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "architectures" / "results.jsonl"
MARKERS = ("<!-- architectures-table:start -->", "<!-- architectures-table:end -->")
ACTIVATIONS = ("fp32", "layer", "native")  # portable_kbit.prepare's activations modes (checked in main)
BLOCKED_MODES = ("fp32+blocks", "native+blocks")  # the same with token blocks
MODES = (*ACTIVATIONS, *BLOCKED_MODES)
OUTCOMES = ("trained", "refused", "control-failed", "config-failed", "failed")
TRACE_OUTCOMES = ("unchanged", "changed")
BLOCK_TOKENS = 8  # token blocks: four blocks of the 32-token sequences

VOCAB = 512  # the tiny vocabulary; special token ids beyond it are put at its top, training ids drawn between
LOW_IDS = 16  # special token ids below this stay (pad/bos/eos: some models tie them to position embeddings)
SPECIAL_IDS = 64  # ids reserved at the top of the vocabulary for the other special tokens (image, audio ...)
SEQ_LEN = 32
SLIDING_WINDOW = 16  # shorter than the sequence: sliding-window masks are exercised
STEPS = 2

# ---- tiny configs ---------------------------------------------------------------------------------------------------

WIDTH = 128
# field name -> tiny value; applied to a config and each nested config where the field holds a larger int
SIZES: dict[str, int] = {}
SIZES.update(
    dict.fromkeys(
        (
            "hidden_size",
            "d_model",
            "n_embd",
            "n_embed",
            "embed_dim",
            "dim",
            "model_dim",
            "embedding_dim",
            "lru_width",
            "word_embed_proj_dim",
            "embedding_size",
            "input_embedding_size",
            "output_embedding_size",
            "backbone_hidden_size",
            "hidden_dim",
            "router_hidden_size",
            "hidden_size_global",
        ),
        WIDTH,
    )
)
SIZES.update(
    dict.fromkeys(
        (
            "intermediate_size",
            "ffn_dim",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "n_inner",
            "d_ff",
            "dim_ff",
            "dff",
            "d_inner",
            "ffn_hidden_size",
            "feed_forward_size",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "shared_intermediate_size",
            "moe_shared_expert_intermediate_size",
            "shared_experts_intermediate_size",
            "expert_ffn_hidden_size",
            "dense_intermediate_size",
            "intermediate_size_mlp",
        ),
        2 * WIDTH,
    )
)
LAYER_FIELDS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "n_layers",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
    "num_encoder_layers",
    "num_blocks",
)
SIZES.update(dict.fromkeys(LAYER_FIELDS, 2))
SIZES.update(
    dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "num_heads",
            "n_heads",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "num_decoder_attention_heads",
            "num_encoder_attention_heads",
            "attention_heads",
            "swa_num_attention_heads",
            "index_n_heads",
            "linear_num_value_heads",
            "linear_num_heads",
            "mamba_n_heads",
            "mamba_num_heads",
            "n_mamba_heads",
        ),
        4,
    )
)
SIZES.update(
    dict.fromkeys(
        ("num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "num_query_groups", "linear_num_key_heads"),
        2,
    )
)
SIZES.update(
    dict.fromkeys(
        (
            "head_dim",
            "swa_head_dim",
            "attention_head_dim",
            "dim_head",
            "d_head",
            "kv_channels",
            "attention_head_size",
            "index_head_dim",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_head_dim",
            "v_head_dim",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
        ),
        WIDTH // 4,
    )
)
SIZES.update(dict.fromkeys(("q_lora_rank", "kv_lora_rank", "o_lora_rank"), 64))
SIZES.update(dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4))
SIZES.update(dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k"), 2))
SIZES.update(dict.fromkeys(("n_shared_experts", "moe_num_shared_experts", "num_shared_experts"), 1))
SIZES.update(dict.fromkeys(("n_group", "num_expert_group", "topk_group", "n_groups", "mamba_n_groups"), 1))
SIZES.update(dict.fromkeys(("mamba_ngroups",), 1))
SIZES.update(dict.fromkeys(("first_k_dense_replace",), 1))
SIZES.update(dict.fromkeys(("qk_head_dim",), WIDTH // 2))  # multi-head latent attention: nope + rope head dims
SIZES.update(dict.fromkeys(("zero_expert_num",), 2))
SIZES.update(dict.fromkeys(("rotary_dim",), WIDTH // 8))  # at most the head dim (32)
SIZES.update(dict.fromkeys(("emb_dim", "encoder_hash_byte_group_vocab", "out_hidden_size"), WIDTH))
SIZES.update(dict.fromkeys(("adapter_in_dim", "adapter_input_size", "adapter_out_dim"), WIDTH))
SIZES.update(dict.fromkeys(("unpadded_vocab_size", "vocab_size_per_layer_input"), VOCAB))
SIZES.update(
    dict.fromkeys(
        (
            "hidden_size_per_layer_input",
            "shape_vocab_size",
            "pronunciation_vocab_size",
            "shape_embed_dim",
            "pronunciation_embed_dim",
            "downsample_hidden_size",
        ),
        64,
    )
)
SIZES.update(
    dict.fromkeys(
        (
            "max_position_embeddings",
            "n_positions",
            "n_ctx",
            "max_target_positions",
            "context_length",
            "max_seq_len",
        ),
        256,
    )
)
SIZES.update(dict.fromkeys(("mamba_d_state", "state_size", "ssm_state_size"), 16))
SIZES.update(dict.fromkeys(("mamba_d_head", "mamba_head_dim", "mamba_headdim"), 64))
SIZES.update(dict.fromkeys(("mamba_dt_rank", "time_step_rank"), 64))  # a LoRA'd dt_proj's in_features
SIZES.update(dict.fromkeys(("mamba_d_ssm",), 256))
SIZES.update(dict.fromkeys(("index_topk",), 16))
SIZES.update(dict.fromkeys(("sliding_window", "sliding_window_size", "attention_window_size"), SLIDING_WINDOW))
SIZES.update(dict.fromkeys(("sliding_window_pattern", "_sliding_window_pattern"), 2))
SIZES.update(dict.fromkeys(("vocab_size", "decoder_vocab_size", "audio_vocab_size"), VOCAB))

# Per model type: fields set after the generic rules ("text_config.x" reaches into a nested config). Each entry says
# why in a comment: the generic rules cannot know a relation between fields.
#: per model type: keyword arguments its default config needs to build at all (transformers' own default fails)
DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma4_assistant": {
        "text_config": {"model_type": "gemma4_text", "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}
    },
}
# Per model type: fields set after the generic rules ("text_config.x" reaches into a nested config), each for a
# relation between fields that the generic rules cannot know, or a default that does not build a model.
OVERRIDES: dict[str, dict[str, Any]] = {
    # defaults that do not build a model (None where the model needs a value)
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    "cohere_compass_text": {
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
    },
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    **{
        name: {
            "text_config.indexer_n_heads": 2,
            "text_config.indexer_kv_heads": 1,
            "text_config.indexer_head_dim": 32,
            "text_config.indexer_budget": 16,
            "text_config.indexer_compress_ratio": 4,
        }
        for name in ("qwen4_exp",)
    },
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 32,
        "indexer_budget": 16,
        "indexer_compress_ratio": 4,
    },
    # layer counts split over stacks, or per-layer kinds given as a period: one layer of each kind
    "dory": {
        "num_hidden_layers": 2,
        "n_input_layers": 1,
        "n_recurrent_layers": 0,
        "n_output_layers": 1,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "hrm_text": {
        "num_hidden_layers": 1,
        "num_layers_per_stack": None,
        "H_cycles": 1,
        "L_cycles": 1,
        "L_bp_cycles": [1],
    },
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # the shared transformer is tied across hybrid layers: two of them
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    "zamba2": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    "gemma3n_text": {"num_kv_shared_layers": 2},
    # the head dim of its sliding-window layers is the latent attention's nope + rope head dims
    "dots3_note": {"text_config.head_dim": WIDTH // 2},
    "dots3_note_text": {"head_dim": WIDTH // 2},
    # state-space sizes: hidden_size * expand = num_heads * head_dim
    "mamba2": {"head_dim": 64},
    # the sequence length must be the product of the axial position shape; chunk lengths divide it
    "reformer": {
        "is_decoder": True,
        "axial_pos_shape": [4, 8],
        "axial_pos_embds_dim": [64, 64],
        "local_attn_chunk_length": 16,
        "lsh_attn_chunk_length": 16,
    },
    "xmod": {"default_language": "en_XX"},
    "mamba": {"time_step_rank": 64},  # "auto" is hidden / 16: a LoRA'd dt_proj needs 64 in_features on the CPU
}

# Fields whose default is None in some configs although the model needs a value (the default config of those types
# does not build a model either): filled with the tiny value.
FILL_NONE = ("head_dim", "num_key_value_heads", "n_routed_experts", "n_shared_experts", "num_experts_per_tok")


def causal_lm_class(model_type: str) -> type:
    """The class AutoModelForCausalLM builds for the type."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[model_type]]


def _token_field(name: str) -> bool:
    return name.endswith(("token_id", "token_index", "token_ids")) and name != "vocab_size"


class ConfigFailed(Exception):
    """No tiny config (or model) could be built for the type: the message says why."""


def _nested(value: Any) -> bool:
    """A nested config in a config's to_dict() (text_config, vision_config ...)."""
    return isinstance(value, dict) and "model_type" in value


def _layer_selection(rows: list[str], layers: int, most: int = 4) -> list[int]:
    """Which layers to keep: the first of each distinct kind (a hybrid model keeps one layer of each: attention and
    state-space, dense and MoE, sliding and full), at least `layers`, at most `most` unless there are more kinds."""
    firsts: list[int] = []
    for i, row in enumerate(rows):
        if row not in [rows[j] for j in firsts]:
            firsts.append(i)
    chosen = firsts[:most] if len(firsts) >= layers else firsts + [i for i in range(len(rows)) if i not in firsts]
    return sorted(chosen[: max(layers, min(len(firsts), most))])


def _shrink(defaults: dict[str, Any]) -> dict[str, Any]:
    """The changed fields of one config level: size fields shrunk, per-layer lists and per-layer dicts cut to the
    kept layers (the same layers for every list), nested configs recursively (passed back as partial dicts)."""
    out: dict[str, Any] = {}
    for name, value in defaults.items():
        if _nested(value):
            out[name] = {"model_type": value["model_type"], **_shrink(value)}
        elif name in SIZES and isinstance(value, int) and not isinstance(value, bool) and value > SIZES[name]:
            out[name] = SIZES[name]
        elif value is None and name in FILL_NONE:
            out[name] = SIZES[name]
    if "kv_lora_rank" in defaults and "num_key_value_heads" in defaults:  # latent attention: one KV head per head
        out["num_key_value_heads"] = out.get("num_attention_heads", defaults.get("num_attention_heads"))
    old = next((defaults[f] for f in LAYER_FIELDS if isinstance(defaults.get(f), int)), None)
    new = next((out[f] for f in LAYER_FIELDS if f in out), None)
    if not old or not new:
        return out
    per_layer = {n: v for n, v in defaults.items() if isinstance(v, list) and len(v) == old}
    rows = [repr([v[i] for v in per_layer.values()]) for i in range(old)]
    chosen = _layer_selection(rows, new) if per_layer else list(range(new))
    for field in LAYER_FIELDS:
        if field in out:
            out[field] = len(chosen)
    for name, value in per_layer.items():
        kept = [value[i] for i in chosen]
        if name in SIZES and all(isinstance(v, int) for v in kept):
            kept = [SIZES[name]] * len(kept)
        out[name] = kept
    for name, value in defaults.items():  # per-layer dicts keyed by layer index (per_layer_config ...)
        if isinstance(value, dict) and value and all(_is_layer_key(k, old) for k in value):
            out[name] = {
                _layer_key(k, chosen.index(int(k))): _shrink_fields(v) for k, v in value.items() if int(k) in chosen
            }
    return out


def _layer_key(old: Any, new: int) -> Any:
    return new if isinstance(old, int) else str(new).zfill(len(old))


def _shrink_fields(value: Any) -> Any:
    """A per-layer override dict ({"num_attention_heads": 64, ...}) with its size fields shrunk."""
    if not isinstance(value, dict):
        return value
    out = {**value, **{k: SIZES[k] for k, v in value.items() if k in SIZES and isinstance(v, int) and v > SIZES[k]}}
    if "kv_lora_rank" in out and "num_key_value_heads" in out and "num_attention_heads" in out:
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


def _is_layer_key(key: Any, layers: int) -> bool:
    return (isinstance(key, int) or (isinstance(key, str) and key.isdigit())) and 0 <= int(key) < layers


def _special_tokens(defaults: dict[str, Any], changes: dict[str, Any], vocab: int, taken: dict[int, int]) -> None:
    """Every special token id at or above LOW_IDS moved to the top of the tiny vocabulary (one old id -> one new id),
    written into `changes`."""

    def new_id(old: int) -> int:
        if old < LOW_IDS:
            return old
        if old not in taken:
            taken[old] = vocab - 1 - len(taken)
        return taken[old]

    for name, value in defaults.items():
        if _nested(value):
            sub = changes.setdefault(name, {"model_type": value["model_type"]})
            _special_tokens(value, sub, int(sub.get("vocab_size") or value.get("vocab_size") or vocab), taken)
        elif _token_field(name) and isinstance(value, int) and not isinstance(value, bool) and value >= LOW_IDS:
            changes[name] = new_id(value)
        elif _token_field(name) and isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            changes[name] = [new_id(v) for v in value]


def _merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """b over a, nested dicts merged."""
    out = dict(a)
    for key, value in b.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set(changes: dict[str, Any], key: str, value: Any) -> None:
    """changes["a.b"] = value, reaching into nested configs."""
    *path, last = key.split(".")
    for part in path:
        changes = changes.setdefault(part, {})
    changes[last] = value


def tiny_config(model_type: str) -> Any:
    """A tiny config of the type: its defaults with the size fields shrunk and OVERRIDES applied (only the changed
    fields are passed, so that derived fields are derived again), validated by the config class.

    Where the causal-LM class takes a nested config (musicgen's decoder), that nested config is the one returned.
    """
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    wanted = getattr(causal_lm_class(model_type), "config_class", None) or config_class
    base = DEFAULTS.get(model_type, {})
    try:
        defaults = config_class(**base).to_dict()
    except Exception as error:
        raise ConfigFailed(f"the default config does not build: {type(error).__name__}: {error}") from error
    changes = _merged(base, _shrink(defaults))
    for key, value in OVERRIDES.get(model_type, {}).items():
        _set(changes, key, value)
    vocab = int(changes.get("vocab_size") or defaults.get("vocab_size") or VOCAB)
    _special_tokens(defaults, changes, vocab, {})
    for key, value in OVERRIDES.get(model_type, {}).items():  # an override wins over the token rule too
        _set(changes, key, value)
    try:
        config = config_class(**changes)
    except Exception as error:
        raise ConfigFailed(f"the tiny config does not validate: {type(error).__name__}: {error}") from error
    if not isinstance(config, wanted):
        nested = [v for name in config.to_dict() if isinstance(v := getattr(config, name, None), wanted)]
        if nested:
            config = nested[0]
    return config


# ---- one model type --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Checkpoint:
    model_type: str
    model_class: type
    path: str
    lora_targets: Any  # peft's defaults for the model type (a list), or "all-linear"
    targets_note: str
    plain_linear: list[str]  # the fallback where peft cannot wrap a module that all-linear picks


def build_checkpoint(model_type: str, workdir: str) -> Checkpoint:
    """The tiny model, random bf16 weights, saved to `workdir` (ConfigFailed: why not)."""
    import torch

    config = tiny_config(model_type)
    model_class = causal_lm_class(model_type)
    torch.manual_seed(0)
    try:
        model = model_class._from_config(config, dtype=torch.bfloat16)
    except Exception as error:
        raise ConfigFailed(f"the tiny model does not build: {type(error).__name__}: {error}") from error
    path = os.path.join(workdir, model_type)
    try:
        model.save_pretrained(path)
    except Exception as error:
        raise ConfigFailed(f"the tiny model does not save: {type(error).__name__}: {error}") from error
    targets, note = lora_targets(model_type, model)
    return Checkpoint(model_type, model_class, path, targets, note, plain_linear_targets(model))


def lora_targets(model_type: str, model: Any) -> tuple[Any, str]:
    """peft's default LoRA targets for the type where it has some that match a module here, else "all-linear"."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    defaults = PEFT_DEFAULTS.get(model_type) or PEFT_DEFAULTS.get(getattr(model.config, "model_type", model_type))
    if defaults is None:
        return "all-linear", "all-linear (peft has no defaults for the type)"
    config = LoraConfig(target_modules=list(defaults))
    if any(check_target_module_exists(config, name) for name, _ in model.named_modules()):
        return sorted(defaults), f"peft's defaults {sorted(defaults)}"
    return "all-linear", f"all-linear (peft's defaults {sorted(defaults)} match no module)"


def plain_linear_targets(model: Any) -> list[str]:
    """The names (last part) of the plain nn.Linear / Conv1D leaves but the output head: all-linear without the
    nn.Linear subclasses (MoE routers returning tuples) that peft's LoRA cannot wrap."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from portable_kbit.model.hf import output_embeddings

    head = output_embeddings(model)
    kinds = (torch.nn.Linear, Conv1D)
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m) in kinds and m is not head}
    return sorted(names)


def load(checkpoint: Checkpoint) -> Any:
    """The checkpoint loaded through bitsandbytes nf4 (double quant, bf16 compute) on the CPU."""
    import torch

    from portable_kbit.tools import tiny

    return checkpoint.model_class.from_pretrained(
        checkpoint.path,
        dtype=torch.bfloat16,
        quantization_config=tiny.quantization_config("bnb-nf4"),
        device_map={"": "cpu"},
    )


def training_batch(model: Any) -> dict[str, Any]:
    """One sequence of token ids (drawn between the low special ids and the ones moved to the top), as input and
    labels; a model with one embedding per codebook (musicgen) takes one row per codebook and labels per codebook.
    No cache: a training step does not want one (and building it fails for some models)."""
    import inspect

    import torch

    from portable_kbit.model.hf import hf_model, input_embeddings

    embeddings = input_embeddings(model)
    codebooks = len(embeddings) if isinstance(embeddings, torch.nn.ModuleList) else 1
    table = embeddings[0] if isinstance(embeddings, torch.nn.ModuleList) else embeddings
    weight = getattr(table, "weight", None)
    vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else VOCAB
    high = max(LOW_IDS + 1, min(vocab, VOCAB) - SPECIAL_IDS)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(LOW_IDS, high, (codebooks, SEQ_LEN), generator=generator)
    labels = ids if codebooks == 1 else ids.T.unsqueeze(0)  # [batch, sequence, codebooks]
    batch: dict[str, Any] = {"input_ids": ids, "labels": labels}
    parameters = inspect.signature(hf_model(model).forward).parameters
    if "use_cache" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        batch["use_cache"] = False
    return batch


@dataclasses.dataclass
class Training:
    losses: list[float]
    nonzero: set[str]  # adapter tensors that got a non-zero gradient at some step
    adapters: int
    non_finite: list[str]


def train_lora(model: Any, targets: Any) -> Training:
    """LoRA r=8 on `targets` (None: peft's defaults), STEPS AdamW steps on one sequence."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    peft_model.train()
    batch = training_batch(peft_model)
    adapters = {n: p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n}
    optimizer = torch.optim.AdamW(list(adapters.values()), lr=1e-2)
    losses: list[float] = []
    nonzero: set[str] = set()
    non_finite: list[str] = []
    for _ in range(STEPS):
        loss = peft_model(**batch).loss
        losses.append(float(loss))
        loss.backward()
        for name, p in adapters.items():
            if p.grad is None:
                continue
            if not bool(torch.isfinite(p.grad).all()):
                non_finite.append(name)
            elif bool(p.grad.abs().sum() > 0):
                nonzero.add(name)
        optimizer.step()
        optimizer.zero_grad()
    return Training(losses, nonzero, len(adapters), sorted(set(non_finite)))


def _model_state() -> Any:
    sys.path.insert(0, str(ROOT / "tests"))
    import model_state

    return model_state


def _error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


def _where(error: BaseException) -> str:
    """The innermost frame of the error, as file:line (the library's or transformers' code)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    frame = frames[-1]
    return f"{'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno}"


def meta_tensors(model: Any) -> list[str]:
    """Buffers and plain tensor attributes on the meta device (a trace on meta inputs must leave none behind)."""
    import torch

    found = []
    for name, module in model.named_modules():
        tensors = {**module._buffers, **{k: v for k, v in vars(module).items() if k != "_buffers"}}
        for key, value in tensors.items():
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                found.append(f"{name}.{key}" if name else key)
    return found


def _innermost_file(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return frames[-1].filename if frames else ""


def quantized_parameters(model: Any) -> dict[str, Any]:
    from portable_kbit.model.quantized import quantization_kind

    return {n: p for n, p in model.named_parameters() if quantization_kind(p) is not None}


def run_control(checkpoint: Checkpoint) -> tuple[dict[str, Any], Training | None]:
    """LoRA on the bare quantized model: does it train without prepare()?"""
    record: dict[str, Any] = {"mode": "control"}
    started = time.perf_counter()
    try:
        model = load(checkpoint)
    except Exception as error:
        raise ConfigFailed(f"the tiny model does not load with bitsandbytes nf4: {_error(error)}") from error
    quantized = quantized_parameters(model)
    record["quantized"] = len(quantized)
    try:
        training = train_lora(model, checkpoint.lora_targets)
    except Exception as error:
        inside_peft = "/peft/" in _innermost_file(error)
        if not (inside_peft and checkpoint.lora_targets == "all-linear" and checkpoint.plain_linear):
            record.update(outcome="control-failed", stage="train", error=_error(error), at=_where(error))
            return record, None
        # peft itself cannot wrap a module that all-linear picks (an nn.Linear subclass with its own forward):
        # the plain nn.Linear layers instead, for the control and every mode
        refused = re.search(r"Incompatible modules: \{([^}]*)\}", str(error))  # peft's Mamba check names them
        if refused:
            names = {n.strip(" '\"") for n in refused.group(1).split(",")}
            checkpoint.plain_linear = [n for n in checkpoint.plain_linear if n not in names]
        checkpoint.lora_targets = checkpoint.plain_linear
        failure = _error(error)[:120]
        plain = checkpoint.plain_linear
        checkpoint.targets_note = f"plain nn.Linear layers {plain} (all-linear fails in peft: {failure})"
        record["targets"] = checkpoint.targets_note
        return run_control(checkpoint)
    record.update(losses=training.losses, adapters=training.adapters, nonzero=len(training.nonzero))
    problem = _training_problem(training)
    if problem:
        record.update(outcome="control-failed", stage="check", error=problem)
        return record, None
    record.update(outcome="trained", seconds=round(time.perf_counter() - started, 2))
    return record, training


def _training_problem(training: Training) -> str | None:
    if not all(math.isfinite(x) for x in training.losses):
        return f"non-finite loss {training.losses}"
    if training.non_finite:
        return f"non-finite adapter gradients: {training.non_finite[:4]}"
    if not training.nonzero:
        return f"no adapter got a gradient ({training.adapters} adapter tensors)"
    return None


def mode_options(mode: str) -> dict[str, Any]:
    """prepare()'s options for a mode of the sweep ("native", "fp32+blocks" ...)."""
    activations, _, blocks = mode.partition("+")
    return {"activations": activations, **({"token_blocks": BLOCK_TOKENS} if blocks else {})}


@contextlib.contextmanager
def small_auto_blocks() -> Iterator[None]:
    """token_blocks="auto" picks blocks of BLOCK_TOKENS here (the backends' sizes are for real lengths)."""
    from portable_kbit.backends.base import Backend

    saved = {k: getattr(Backend, k) for k in ("default_block_tokens", "min_block_tokens", "block_token_multiple")}
    for key in saved:
        setattr(Backend, key, BLOCK_TOKENS)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(Backend, key, value)


def blocks_problem(report: Any) -> str | None:
    """What prepare() planned in token blocks but did not run in blocks while training (None: all of it ran)."""
    calls = report.token_block_calls.to_dict() if report.token_block_calls is not None else {}
    missing = []
    if report.blocked_head is not None and not calls.get("head and loss", {}).get("blocked"):
        missing.append(f"the head and loss ({calls.get('head and loss')})")
    if report.blocked_mlps and not calls.get("MLPs", {}).get("blocked"):
        missing.append(f"the MLPs ({calls.get('MLPs')})")
    return f"planned in token blocks but never run in blocks: {'; '.join(missing)}" if missing else None


def run_mode(checkpoint: Checkpoint, mode: str, control: Training, **prepare_kwargs: Any) -> dict[str, Any]:
    """prepare() in a mode of the sweep on a fresh load, then the control's LoRA training; the checks of `trained`.
    `prepare_kwargs` add to (or replace) the mode's options: a retry."""
    import portable_kbit

    model_state = _model_state()
    record: dict[str, Any] = {"mode": mode}
    if prepare_kwargs:
        record["prepare_kwargs"] = {k: repr(v) for k, v in prepare_kwargs.items()}
    options = {**mode_options(mode), **prepare_kwargs}
    started = time.perf_counter()
    model = load(checkpoint)
    quantized = quantized_parameters(model)
    bits = {n: model_state.raw_bytes(p) for n, p in quantized.items()}
    parameters = dict(model.named_parameters())
    dtypes = {n: p.dtype for n, p in parameters.items()}
    before = model_state.take(model)
    try:
        with small_auto_blocks():
            portable_kbit.prepare(model, target_modules=checkpoint.lora_targets, **options)
    except Exception as error:
        differences = before.diff(model_state.take(model))
        restored = any("restored" in note for note in getattr(error, "__notes__", []))
        record.update(error=_error(error), at=_where(error), stage="prepare")
        if differences:
            record.update(outcome="failed", changed=differences[:5])
        elif restored:  # raised after the first change: a failure that the transaction undid, not a refusal
            record.update(outcome="failed", rolled_back=True)
        else:
            record.update(outcome="refused", reason=str(error).split("\n")[0])
        return record
    report = portable_kbit.report(model)
    assert report is not None
    record.update(
        upcast=len(report.upcast),
        fp32_norms=len(report.upcast_norms),
        input_guards=report.input_guards,
        notes=report.notes,
    )
    if report.token_blocks is not None:
        record.update(blocked_head=report.blocked_head, blocked_mlps=len(report.blocked_mlps))
        record["not_blocked"] = report.not_blocked
    left_on_meta = meta_tensors(model)
    changed = sorted(n for n, p in parameters.items() if p.dtype != dtypes[n])
    unplanned = [n for n in changed if n not in set(report.upcast)]
    prepared = {n: p.dtype for n, p in parameters.items()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            training = train_lora(model, checkpoint.lora_targets)
    except Exception as error:
        record.update(outcome="failed", stage="train", error=_error(error), at=_where(error))
        return record
    ours = sorted({str(w.message) for w in caught if "portable_kbit" in str(w.message)})
    if ours:
        record["warnings"] = ours
    record.update(losses=training.losses, adapters=training.adapters, nonzero=len(training.nonzero))
    problems = []
    if problem := _training_problem(training):
        problems.append(problem)
    missing = sorted(n for n in control.nonzero - training.nonzero if "expert" not in n)
    if missing:
        problems.append(f"{len(missing)} adapters get a gradient in the control but none here: {missing[:3]}")
    if left_on_meta:
        problems.append(f"tensors left on the meta device by prepare(): {left_on_meta[:3]}")
    if unplanned:
        problems.append(f"parameters changed dtype that the plan did not name: {unplanned[:3]}")
    retyped = [n for n, p in parameters.items() if p.dtype != prepared[n]]
    if retyped:
        problems.append(f"parameters changed dtype during training: {retyped[:3]}")
    touched = [n for n, p in quantized.items() if not model_state.same_bytes(model_state.raw_bytes(p), bits[n])]
    if touched:
        problems.append(f"quantized weights changed: {touched[:3]}")
    if report.token_block_calls is not None:
        record["token_block_calls"] = report.token_block_calls.to_dict()
        if problem := blocks_problem(report):
            problems.append(problem)
    if problems:
        record.update(outcome="failed", stage="check", error="; ".join(problems))
    else:
        record.update(outcome="trained", seconds=round(time.perf_counter() - started, 2))
    return record


#: why a type's control fails or no tiny model is built (read from the model code), for the summary
WHY = {
    "gemma3n": "its vision tower needs timm, not installed here",
    "gemma3n_text": "its forward clamps `prediction_coefs.weight.data` in place, a 4-bit weight under bitsandbytes",
    "gemma4_assistant": "a drafter: it needs the main model's hidden states and KV states",
    "gemma4_unified_assistant": "a drafter: it needs the main model's hidden states and KV states",
    "git": "text-only training: its loss drops the image-token positions the sequence does not have",
    "longcat_flash": "its router reads `classifier.weight` directly, a 4-bit weight under bitsandbytes",
    "mamba": "its slow path reads `dt_proj.weight` directly, a 4-bit weight under bitsandbytes",
    "reformer": "bf16 on the CPU: a layer norm gets fp32 activations with bf16 parameters in the model's own code",
    "xlnet": "bf16: an einsum in the model's own relative attention mixes fp32 and bf16",
}

#: a refusal whose reason names this way forward is retried with it (the record keeps both outcomes)
RETRIES = {  # the first phrase found is the retry; a retry refused again is retried with both
    "{'use_reentrant': False}": {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
    "use_gradient_checkpointing=False": {"use_gradient_checkpointing": False},
    "token_blocks='auto'": {"token_blocks": "auto"},
}
MAX_RETRIES = 2


def run_with_retries(checkpoint: Checkpoint, mode: str, control: Training) -> dict[str, Any]:
    """run_mode; where prepare() refuses naming a way forward (RETRIES), once more with it (and again, up to
    MAX_RETRIES). The record is the first run's, with the last retry's outcome under "retry"."""
    record = run_mode(checkpoint, mode, control)
    last, kwargs = record, {}
    for _ in range(MAX_RETRIES):
        found = next((extra for phrase, extra in RETRIES.items() if phrase in last.get("reason", "")), None)
        if last["outcome"] != "refused" or found is None:
            break
        kwargs = {**kwargs, **found}
        last = run_mode(checkpoint, mode, control, **kwargs)
        record["retry"] = {k: last.get(k) for k in ("prepare_kwargs", "outcome", "error", "reason", "losses")}
    return record


def check_trace(checkpoint: Checkpoint) -> dict[str, Any]:
    """The trace prepare() runs (as with token blocks: the forward with labels) on a fresh load: the model state
    before and after compared in full, and no tensor left on the meta device."""
    from portable_kbit.pipeline.prepare import planned_changes

    model_state = _model_state()
    record: dict[str, Any] = {"mode": "trace"}
    model = load(checkpoint)
    before = model_state.take(model)
    _, found = planned_changes(model, "adjacent", checkpoint.lora_targets, token_blocks=BLOCK_TOKENS)
    assert found is not None
    differences = before.diff(model_state.take(model)) + [f"on meta: {n}" for n in meta_tensors(model)]
    record.update(rung=found.rung, trace_error=found.error, seconds=round(found.seconds, 3))
    if differences:
        record.update(outcome="changed", error="; ".join(differences[:5]))
    else:
        record["outcome"] = "unchanged"
    return record


def run_type(model_type: str, modes: Iterable[str] = MODES, workdir: str | None = None) -> list[dict[str, Any]]:
    """The control and every mode for one model type; one record each (config-failed: one record per mode)."""
    import transformers

    modes = list(modes)
    base = {"model_type": model_type, "transformers": transformers.__version__}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"sweep_{model_type}_"))
        try:
            checkpoint = build_checkpoint(model_type, workdir)
            base.update(model_class=checkpoint.model_class.__name__, targets=checkpoint.targets_note)
            control_record, control = run_control(checkpoint)
        except ConfigFailed as error:
            return [{**base, "mode": mode, "outcome": "config-failed", "reason": str(error)} for mode in modes]
        base["targets"] = checkpoint.targets_note  # the control may have fallen back to plain nn.Linear layers
        records = [{**base, **control_record}]
        try:
            records.append({**base, **check_trace(checkpoint)})
        except Exception as error:  # the sweep's own step failed: a change it could not check
            failed = {"mode": "trace", "outcome": "changed", "error": _error(error), "at": _where(error)}
            records.append({**base, **failed})
        for mode in modes:
            if control is None:
                records.append({**base, "mode": mode, "outcome": "control-failed"})
                continue
            try:
                record = run_with_retries(checkpoint, mode, control)
            except Exception as error:  # the sweep's own step failed (loading ...): a failure of this mode
                record = {"mode": mode, "outcome": "failed", "stage": "sweep", "error": _error(error)}
                record["at"] = _where(error)
            records.append({**base, **record})
    for record in records:
        record.setdefault("type_seconds", round(time.perf_counter() - started, 1))
    return records


# ---- the sweep: one subprocess per type --------------------------------------------------------------------------


def all_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_in_subprocess(model_type: str, timeout: float, modes: Iterable[str] = MODES) -> list[dict[str, Any]]:
    """run_type in a fresh process; a crash or a timeout is a failure of every mode, with what the process said."""
    modes = list(modes)
    with tempfile.TemporaryDirectory(prefix="sweep_") as tmp:
        out = os.path.join(tmp, "records.jsonl")
        command = [sys.executable, __file__, "--one", model_type, "--modes", ",".join(modes), "--records", out]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=timeout)
            error = None if done.returncode == 0 else f"exit code {done.returncode}: {done.stderr[-500:].strip()}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s"
        if error is None and os.path.exists(out):
            return read(Path(out))
    seconds = round(time.perf_counter() - started, 1)
    return [
        {"model_type": model_type, "mode": mode, "outcome": "failed", "stage": "subprocess", "error": error}
        | {"type_seconds": seconds}
        for mode in ["control", "trace", *modes]
    ]


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    order = {mode: i for i, mode in enumerate(("control", "trace", *MODES))}
    records = sorted(records, key=lambda r: (r["model_type"], order.get(r["mode"], 99)))
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def sweep(types: list[str], jobs: int, timeout: float, log: Any = sys.stderr) -> Iterator[list[dict[str, Any]]]:
    """Each type's records as its subprocess finishes (`jobs` at a time)."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_in_subprocess, t, timeout) for t in types]
        for i, (model_type, future) in enumerate(zip(types, futures, strict=True)):
            records = future.result()
            outcomes = ", ".join(f"{r['mode']}: {r['outcome']}" for r in records)
            print(f"[{i + 1}/{len(types)}] {model_type}: {outcomes}", file=log, flush=True)
            yield records


# ---- the summary table ----------------------------------------------------------------------------------------------


def summary(records: list[dict[str, Any]]) -> str:
    """Markdown: counts per outcome and mode, the refusals with their reason, the failures with their error."""
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    by_type: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        by_type.setdefault(record["model_type"], {})[record["mode"]] = record
    versions = sorted({r["transformers"] for r in records if r.get("transformers")})
    lines = [
        f"{len(by_type)} model types (transformers {', '.join(versions) or '?'}: every type in "
        "`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), bitsandbytes nf4 on the CPU, LoRA r=8, "
        f"{STEPS} AdamW steps. Source: `benchmarks/results/architectures/results.jsonl`.",
        "",
        "| outcome | " + " | ".join(f"`{m}`" for m in modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for outcome in OUTCOMES:
        counts = [sum(1 for t in by_type.values() if t.get(m, {}).get("outcome") == outcome) for m in modes]
        lines.append(f"| {outcome} | " + " | ".join(str(c) for c in counts) + " |")
    blocked = [m for m in modes if m in BLOCKED_MODES]
    if blocked:
        lines.append("")
        for mode in blocked:
            trained = [t[mode] for t in by_type.values() if t.get(mode, {}).get("outcome") == "trained"]
            retried = [t[mode]["retry"] for t in by_type.values() if t.get(mode, {}).get("outcome") == "refused"]
            trained_retries = sum(1 for r in retried if r and r.get("outcome") == "trained")
            head = sum(1 for r in trained if r.get("blocked_head"))
            mlps = sum(1 for r in trained if r.get("blocked_mlps"))
            lines.append(
                f"`{mode}` (token_blocks={BLOCK_TOKENS}): {len(trained)} types trained, with the head and loss in "
                f"blocks for {head} and MLPs in blocks for {mlps}; {trained_retries} of the {len(retried)} refused "
                "trained when retried with the option their refusal names."
            )
    traces = [t["trace"] for t in by_type.values() if "trace" in t]
    if traces:
        unchanged = sum(1 for r in traces if r["outcome"] == "unchanged")
        lines += ["", f"The trace prepare() runs left {unchanged} of {len(traces)} models exactly as they were."]
    changed = [
        (name, t["trace"]) for name, t in sorted(by_type.items()) if t.get("trace", {}).get("outcome") == "changed"
    ]
    if changed:
        lines += ["", "**Changed by the trace**:", ""]
        lines += [f"- `{name}`: {_one_line(str(r.get('error')))}" for name, r in changed]
    sections = (
        ("refused", "Refused (before any change), with the reason", "reason"),
        ("failed", "Failed", "error"),
        ("control-failed", "LoRA fails without prepare() too (control)", "error"),
        ("config-failed", "No tiny model could be built", "reason"),
    )
    for outcome, title, field in sections:
        rows: dict[str, list[str]] = {}
        for model_type, per_mode in sorted(by_type.items()):
            hit = [m for m in modes if per_mode.get(m, {}).get("outcome") == outcome]
            if not hit:
                continue
            source = (per_mode.get("control") if outcome == "control-failed" else per_mode[hit[0]]) or {}
            text = _one_line(str(source.get(field) or source.get("error") or ""))
            if source.get("at") and outcome in ("failed", "control-failed"):
                text += f" (at `{source['at']}`)"
            if model_type in WHY and outcome in ("control-failed", "config-failed"):
                text = f"{WHY[model_type]}: {text}"
            retry = per_mode[hit[0]].get("retry")
            if retry:
                options = ", ".join(f"{k}={v}" for k, v in (retry.get("prepare_kwargs") or {}).items())
                text += f" Retried with `{options}`: {retry.get('outcome')}."
            modes_text = "all modes" if len(hit) == len(modes) else ", ".join(hit)
            rows.setdefault(text, []).append(f"`{model_type}` ({modes_text})")
        if rows:
            lines += ["", f"**{title}**:", ""]
            lines += [f"- {', '.join(types)}: {reason}" for reason, types in rows.items()]
    return "\n".join(lines)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def write_table(page: Path, table: str) -> None:
    """Replace what stands between the MARKERS of a markdown page with the table."""
    text = page.read_text()
    start, end = MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"{page} has no {start} ... {end} section")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{start}\n{table}\n{end}{tail}")


# ---- command line -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", help="comma-separated model types (default: every causal LM type)")
    parser.add_argument("--jobs", type=int, default=1, help="types run at once, each in its own process")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per type")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON lines; a sample replaces its types' records")
    parser.add_argument("--table", action="store_true", help="print the summary table of --out and stop")
    parser.add_argument(
        "--write",
        "--readme",
        dest="write",
        type=Path,
        metavar="PATH",
        help="write the summary table of --out between the table markers of this markdown page and stop "
        "(docs/architectures.md; --readme is the old name)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: one type, records to --records
    parser.add_argument("--modes", default=",".join(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--records", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        import torch
        import transformers

        torch.set_num_threads(1)
        transformers.logging.set_verbosity_error()
        records = run_type(args.one, args.modes.split(","))
        args.records.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
        return 0
    if args.table or args.write:
        table = summary(read(args.out))
        if args.write:
            write_table(args.write, table)
        else:
            print(table)
        return 0

    from portable_kbit.pipeline.prepare import ACTIVATIONS as PREPARE_ACTIVATIONS

    assert tuple(PREPARE_ACTIVATIONS) == ACTIVATIONS, f"the sweep's {ACTIVATIONS} are not prepare()'s"
    known = all_types()
    types = args.types.split(",") if args.types else known
    unknown = sorted(set(types) - set(known))
    if unknown:
        raise SystemExit(f"not causal-LM model types of this transformers: {', '.join(unknown)}")
    kept = [r for r in read(args.out) if r["model_type"] not in set(types)] if args.types else []
    records = list(kept)
    started = time.perf_counter()
    for type_records in sweep(types, args.jobs, args.timeout):
        records += type_records
        write(args.out, records)  # as it goes: an interrupted sweep keeps what it has
    print(f"{len(types)} types in {time.perf_counter() - started:.0f} s -> {args.out}", file=sys.stderr)
    print(summary(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
