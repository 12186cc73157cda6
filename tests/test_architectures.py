"""A sample of transformers' causal-LM model types, one or more per structural family, through the sweep's own code
(benchmarks/architectures.py: tiny config, bitsandbytes nf4 on the CPU, the control, then prepare() in every
activations mode with LoRA and two AdamW steps).

Each type must train in every mode (token blocks included: what prepare() planned in blocks ran in blocks), or be
refused before any change with the documented reason, and then train with the option the refusal names; and the trace
prepare() runs must leave it exactly as it was. The full sweep (every type) is `python benchmarks/architectures.py`;
its committed results are in benchmarks/results/architectures/.
"""

from __future__ import annotations

import benchmark_scripts
import pytest

architectures = benchmark_scripts.load("architectures")

FAMILIES: dict[str, list[str]] = {
    "dense": ["llama", "qwen3", "gemma2", "mistral", "phi3", "cohere2"],
    # experts stored as 3-D nn.Parameters and routers as bare [experts, hidden] parameters (transformers 5)
    "MoE with grouped experts": ["qwen3_moe", "gpt_oss", "granitemoe", "mixtral", "olmoe", "deepseek_v3", "phimoe"],
    "post-norm": ["bert", "roformer"],
    "parallel attention/MLP": ["gpt_neox", "gptj", "falcon", "phi"],
    "Conv1D": ["gpt2", "gpt_bigcode"],
    "encoder-decoder (the decoder as a causal LM)": ["bart", "whisper"],
    "hybrid state-space": ["jamba", "bamba", "zamba", "falcon_h1", "granitemoehybrid", "lfm2", "qwen3_next"],
    "ALiBi": ["bloom"],
    # a forward that changes the model's own state (BigBird switches to full attention for short sequences)
    "self-modifying forward": ["big_bird"],
    # one of each fix: a 2-D projection beside children (fallback), a block mixing its input with fp32 results in a
    # matmul (layer mode), in-place adds to the embedding output (input gradients off the leaves)
    "unusual": ["inkling2_text", "deepseek_v4", "blt"],
    # refused before any change, with the option that works
    "no gradient checkpointing": ["ctrl"],
    "per-codebook input embeddings": ["musicgen"],
}
REFUSED = {
    "ctrl": "use_gradient_checkpointing=False",
    "musicgen": "{'use_reentrant': False}",
}
SAMPLE = [model_type for types in FAMILIES.values() for model_type in types]
#: the transformers the sample was chosen with: every type in it ships from this version on
SAMPLE_TRANSFORMERS = (5, 25)
KNOWN = set(architectures.all_types())


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def test_the_sample_is_large_and_known():
    assert len(set(SAMPLE)) == len(SAMPLE)
    assert len([t for t in SAMPLE if t in KNOWN]) >= 25
    assert all(any(t in KNOWN for t in types) for types in FAMILIES.values()), "a family with no type here"
    if _transformers_version() >= SAMPLE_TRANSFORMERS:
        assert set(SAMPLE) <= KNOWN


@pytest.mark.parametrize("model_type", SAMPLE)
def test_type_trains_or_is_refused_in_every_mode(model_type, tmp_path):
    if model_type not in KNOWN:  # an older transformers (the GPU image's, say) than the sample was chosen with
        pytest.skip(f"transformers {'.'.join(map(str, _transformers_version()))} does not ship {model_type}")
    records = architectures.run_type(model_type, workdir=str(tmp_path))
    by_mode = {record["mode"]: record for record in records}
    control = by_mode.get("control", records[0])
    if control["outcome"] != "trained" and _transformers_version() < SAMPLE_TRANSFORMERS:
        # not ours: the type fails without prepare() on this older transformers (5.17: deepseek_v4's control, and
        # musicgen's tiny config)
        pytest.skip(f"{model_type} is {control['outcome']} on transformers {_transformers_version()}: {control}"[:300])
    assert control["mode"] == "control" and control["outcome"] == "trained", control
    assert by_mode["trace"]["outcome"] == "unchanged", by_mode["trace"]
    for mode in architectures.MODES:
        record = by_mode[mode]
        if model_type in REFUSED:
            assert record["outcome"] == "refused", record
            assert REFUSED[model_type] in record["reason"], record["reason"]
            assert record["retry"]["outcome"] == "trained", record["retry"]
        elif mode in architectures.BLOCKED_MODES and record["outcome"] == "refused":
            # an explicit block size for a head and loss that cannot run in blocks: "auto" leaves the head alone
            assert "token_blocks='auto'" in record["reason"], record["reason"]
            assert record["retry"]["outcome"] == "trained", record["retry"]
        else:
            assert record["outcome"] == "trained", record


def test_the_trace_leaves_tensor_attributes_alone(tmp_path):
    """prepare()'s trace runs the model on meta inputs; a forward that caches a tensor on the module (CTRL:
    `self.pos_encoding = self.pos_encoding.to(device=...)`) must not keep the meta copy."""
    import torch

    import portable_kbit

    checkpoint = architectures.build_checkpoint("ctrl", str(tmp_path))
    model = architectures.load(checkpoint)
    table = model.transformer.pos_encoding
    portable_kbit.prepare(model, target_modules=checkpoint.lora_targets, use_gradient_checkpointing=False)
    assert model.transformer.pos_encoding is table and table.device == torch.device("cpu")
    assert architectures.meta_tensors(model) == []
