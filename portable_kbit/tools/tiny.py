"""Tiny models built from configs, saved locally and loaded back through a real quantizer. No download.

Used by the demo, the tests and the CPU-sized benchmark. Hidden sizes are multiples of 64: bitsandbytes 0.50 on CPU
fails for in_features that are not a multiple of its 4-bit blocksize.
"""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any

import torch

from .quiet import quiet

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox", "opt")
QUANTIZERS = ("bnb-nf4", "bnb-fp4", "bnb-8bit", "quanto-int8", "quanto-int4", "quanto-float8", "none")

# LoRA targets per architecture (the attention projections; peft's defaults where it has them)
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
}


def config_for(arch: str, hidden: int = 128, layers: int = 2, vocab: int = 256) -> Any:
    """A small transformers config of the given architecture."""
    import transformers as tf

    heads = max(2, hidden // 32)
    common_decoder: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=heads // 2, **common_decoder)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=heads // 2, sliding_window=None, **common_decoder)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=heads // 2, **common_decoder)
    if arch == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=heads // 2, head_dim=hidden // heads, **common_decoder)
    if arch == "gemma":
        return tf.GemmaConfig(num_key_value_heads=heads // 2, head_dim=hidden // heads, **common_decoder)
    if arch == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=heads // 2, head_dim=hidden // heads, **common_decoder)
    if arch == "phi3":
        return tf.Phi3Config(
            num_key_value_heads=heads, pad_token_id=0, bos_token_id=1, eos_token_id=2, **common_decoder
        )
    if arch == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=256,
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
            tie_word_embeddings=False,
        )
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=256,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        )
    if arch == "opt":
        return tf.OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


@functools.cache
def checkpoint(arch: str = "llama", hidden: int = 128, layers: int = 2, vocab: int = 256, seed: int = 0) -> str:
    """Build a random bf16 model of `arch` and save it to a temporary folder (once per process); returns the path.
    Without the libraries' progress bars and notices (portable_kbit.tools.quiet)."""
    with quiet():
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config_for(arch, hidden, layers, vocab), dtype=torch.bfloat16)
        path = os.path.join(tempfile.mkdtemp(prefix=f"portable_kbit_{arch}_"), "model")
        model.save_pretrained(path)
    return path


def quantization_config(
    quantizer: str, compute_dtype: torch.dtype = torch.bfloat16, quant_storage: torch.dtype | None = None
) -> Any | None:
    """`quant_storage`: the dtype bitsandbytes packs 4-bit weights into (bf16 to shard them with FSDP), else uint8."""
    from transformers import BitsAndBytesConfig, QuantoConfig

    if quantizer in ("bnb-nf4", "bnb-fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantizer.split("-")[1],
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=quant_storage or torch.uint8,
        )
    if quantizer == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantizer.startswith("quanto-"):
        return QuantoConfig(weights=quantizer.split("-")[1])
    if quantizer == "none":
        return None
    raise ValueError(f"unknown quantizer {quantizer!r}; known: {', '.join(QUANTIZERS)}")


def load(path: str, quantizer: str = "bnb-nf4", device: str = "cpu", quant_storage: torch.dtype | None = None) -> Any:
    """Load a saved checkpoint through the real quantizer onto `device` (bitsandbytes quantizes while loading), without
    the libraries' progress bars, notices and import-time messages (portable_kbit.tools.quiet)."""
    with quiet():
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": torch.bfloat16}
        config = quantization_config(quantizer, quant_storage=quant_storage)
        if config is not None:
            kwargs["quantization_config"] = config
        if device != "cpu" or quantizer.startswith("bnb-"):  # without a device_map bitsandbytes picks the GPU itself
            kwargs["device_map"] = {"": device}
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def batch(vocab: int = 256, length: int = 32, seed: int = 1, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=generator).to(device)


def train_lora(
    model: Any, targets: list[str], steps: int = 5, lr: float = 1e-2, length: int = 32, r: int = 8, seed: int = 1
) -> tuple[Any, list[float]]:
    """Attach LoRA (unless `model` already is a PeftModel), train `steps` AdamW steps; returns (model, losses)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if not isinstance(model, PeftModel):
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    model.train()
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = batch(vocab, length, seed, str(device))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.item()))
    return model, losses
