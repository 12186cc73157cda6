"""Run by tests/test_fsdp.py under `torchrun --nproc-per-node 2` (gloo, CPU): prepare() with its defaults, then LoRA,
then FSDP1 (per decoder layer, use_orig_params True and False) or FSDP2 (fully_shard per decoder layer and the root,
no policy or a bf16 MixedPrecisionPolicy), 3 AdamW steps; and the same model trained without sharding as the
reference. Rank 0 prints one JSON line per case. Usage: fsdp_worker.py CHECKPOINT OUT.jsonl
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

import portable_kbit
from portable_kbit.tools import tiny

TARGETS = tiny.LORA_TARGETS["llama"]
WRAPS = ("none", "fsdp1-orig-params", "fsdp1-flat-params", "fsdp2", "fsdp2-bf16")
CASES = [(activations, wrap, False) for activations in ("fp32", "layer", "native") for wrap in WRAPS]
CASES += [("fp32", "none", True), ("fp32", "fsdp2", True)]  # LoRA with modules_to_save (lm_head trained in full)
# prepare(offload_checkpoints=True) under FSDP, with the CPU standing in for a device with memory of its own
CASES += [("fp32", "fsdp2+offload", False), ("native", "fsdp1-orig-params+offload", False)]


def _bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.detach().reshape(-1).view(torch.uint8).clone().tolist())


def packed_bytes(model) -> dict[str, bytes]:
    import bitsandbytes as bnb

    return {n: _bytes(m.weight) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def record_forward_weights(model) -> tuple[dict[str, bytes], list]:
    """The 4-bit weight each layer computes with in its first forward: under FSDP, the all-gathered one."""
    import bitsandbytes as bnb

    seen: dict[str, bytes] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):

            def hook(module, args, name=name):
                seen.setdefault(name, _bytes(module.weight))

            handles.append(module.register_forward_pre_hook(hook))
    return seen, handles


def wrap_model(model, wrap: str):
    if wrap.startswith("fsdp1"):
        from peft.utils.other import fsdp_auto_wrap_policy
        from torch.distributed.fsdp import FullyShardedDataParallel

        # peft's policy: each decoder layer, and each trainable leaf (LoRA) in a unit of its own
        return FullyShardedDataParallel(
            model,
            auto_wrap_policy=fsdp_auto_wrap_policy(model),
            use_orig_params=wrap == "fsdp1-orig-params",
            device_id=torch.device("cpu"),
        )
    if wrap.startswith("fsdp2"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # cast_forward_inputs=False: the policy would round the fp32 stream between layers to bf16
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, cast_forward_inputs=False)
        mp = policy if wrap == "fsdp2-bf16" else MixedPrecisionPolicy()
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def run_case(checkpoint: str, activations: str, wrap: str, modules_to_save: bool) -> dict:
    torch.manual_seed(0)
    model = tiny.load(checkpoint, "bnb-nf4", "cpu", quant_storage=torch.bfloat16)
    base = model
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    wrap, _, offload = wrap.partition("+")
    with offload_standin(bool(offload)):
        portable_kbit.prepare(
            model,
            "cpu",
            target_modules=TARGETS,
            activations=activations,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            offload_checkpoints=bool(offload),
        )
    unchanged = {n: p.dtype for n, p in model.named_parameters()} == dtypes
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=TARGETS,
        lora_dropout=0.0,
        modules_to_save=["lm_head"] if modules_to_save else None,
    )
    model = get_peft_model(model, config)
    packed = packed_bytes(model)
    model = wrap_model(model, wrap)
    used, handles = record_forward_weights(model)
    model.train()
    ids = tiny.batch(256, 32, 1, "cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    for handle in handles:
        handle.remove()
    # the 4-bit weights the layers computed with, byte for byte as loaded (bitsandbytes issue 1945: NaN bit patterns
    # in bf16-packed NF4 data canonicalized by FSDP2's all-gather)
    same_packed = used == packed
    done = portable_kbit.report(base).offload
    return {
        "activations": activations,
        "wrap": wrap + ("+offload" if offload else ""),
        "offloaded_tensors": done.offloaded if done is not None else None,
        "modules_to_save": modules_to_save,
        "losses": losses,
        "dtypes_unchanged_by_prepare": unchanged,
        "packed_weights_unchanged": same_packed,
    }


@contextlib.contextmanager
def offload_standin(on: bool) -> Iterator[None]:
    """The CPU backend as if the device had memory of its own (tests/test_offload.py's stand-in), every saved tensor
    worth a copy: the offload hooks run for real, copying from the CPU to the CPU."""
    if not on:
        yield
        return
    from portable_kbit.backends.cpu import CpuBackend
    from portable_kbit.patches import offload

    saved = CpuBackend.why_no_offload, offload.MIN_OFFLOAD_BYTES
    CpuBackend.why_no_offload = lambda self, device: None
    offload.MIN_OFFLOAD_BYTES = 0
    try:
        yield
    finally:
        CpuBackend.why_no_offload, offload.MIN_OFFLOAD_BYTES = saved


def main() -> None:
    warnings.simplefilter("ignore")  # third-party noise on stderr; the test reads the JSON lines
    checkpoint, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    records = [run_case(checkpoint, *case) for case in CASES]
    if dist.get_rank() == 0:
        with open(out, "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
