"""The presets are the shapes they say: each config builds (on the meta device: no memory) into a model of about its
stated checkpoint size, and the Llama-3.1-8B one has the published shape (issue 22's benchmarks run on it)."""

from __future__ import annotations

import pytest
import torch
import transformers

from portable_kbit.tools import presets


def meta_model(name: str):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(presets.PRESETS[name].config(), dtype=torch.bfloat16)


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_each_preset_is_about_its_stated_size(name):
    model = meta_model(name)
    saved = sum(p.numel() * p.element_size() for p in model.parameters())
    assert abs(saved / presets.PRESETS[name].approx_bytes - 1) < 0.05, (name, saved)


def test_llama_3_1_8b_has_the_published_shape():
    config = presets.PRESETS["llama-3.1-8b"].config()
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (128256, 4096, 14336)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (32, 32, 8)
    assert config.max_position_embeddings == 131072 and not config.tie_word_embeddings
    rope = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 8192
    assert sum(p.numel() for p in meta_model("llama-3.1-8b").parameters()) == 8_030_261_248
