"""A tiny random Llama built from a config (no download), the model of the tests that need only a causal LM."""

from __future__ import annotations

import torch
import transformers

CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_llama(dtype: torch.dtype = torch.float32, **overrides) -> transformers.PreTrainedModel:
    """CONFIG with `overrides`, weights from seed 0, in `dtype`."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**CONFIG, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
