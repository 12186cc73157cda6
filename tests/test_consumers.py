"""Dtype-strict consumers found by what they hold and do, and the rules they get (flow.py).

- A module that computes with matrices of its own outside nn.Linear (an MoE router's [experts, hidden] weight,
  grouped experts' [experts, ffn, hidden] stacks, a custom projection) computes in its matrices' dtype when the flow
  hands it fp32, and returns fp32: on a tiny MoE written here, and on transformers' own MoE models.
- A module with matrix-holding children counts only with a stack of matrices of its own (per-head matrices); one
  with 2-D matrices (a relative-position projection beside a child Linear) switches to its matrices' dtype the first
  time an fp32 input fails it, with a warning, and is left alone while fp32 works (a state-space A_log).
- Broadcast vectors ([1, 1, hidden]) are not matrices; a parameter that peft's LoRA parametrizes still counts; fp32
  parameters a model keeps on purpose beside bf16 ones do not decide the dtype.
- activations="layer": each block computes as in "fp32" mode from inside its checkpoint: what the checkpoint keeps is
  the bf16 input, what the block's modules get is fp32 (masks and rotary cos/sin included).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import bitsandbytes_supports
from peft import LoraConfig, get_peft_model
from torch import nn

import portable_kbit
from portable_kbit.patches.dtype_flow import install, is_strict_consumer, may_need_input_cast
from portable_kbit.tools import tiny

BF16, FP32 = torch.bfloat16, torch.float32


class Router(nn.Module):
    """An MoE router as transformers 5 writes them: a bare [experts, hidden] parameter in F.linear."""

    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden) / hidden**0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)
        return logits, logits.softmax(-1, dtype=torch.float32).topk(1, dim=-1).indices


class GroupedExperts(nn.Module):
    """Grouped experts as one [experts, ffn, hidden] stack per projection, called with keywords."""

    def __init__(self, hidden: int, ffn: int, experts: int) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(experts, ffn, hidden) / hidden**0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, ffn) / ffn**0.5)

    def forward(self, hidden_states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.up.shape[0]):
            rows = (index[:, 0] == e).nonzero().flatten()
            h = F.linear(F.silu(F.linear(hidden_states[rows], self.up[e])), self.down[e])
            out = out.index_add(0, rows, h.to(out.dtype))
        return out


class TinyMoE(nn.Module):
    def __init__(self, hidden: int = 64, ffn: int = 128, experts: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.gate = Router(hidden, experts)
        self.experts = GroupedExperts(hidden, ffn, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        _, index = self.gate(h)
        return x + self.experts(hidden_states=h, index=index)


def fp32_flow(model: TinyMoE, consumers: list[nn.Module], fallbacks: list[nn.Module] = ()) -> list:
    """The patches prepare() applies with activations="fp32": the norm hands fp32 on, the consumers are guarded."""
    model.norm.float()
    return applied(install({model.norm: BF16}, consumers, "fp32", fallback_consumers=fallbacks))


def applied(patches: list) -> list:
    for patch in patches:
        patch.apply()
    return patches


def test_router_and_grouped_experts_are_consumers_and_compute_in_their_dtype():
    model = TinyMoE().to(BF16)
    assert is_strict_consumer(model.gate) and is_strict_consumer(model.experts)
    assert not is_strict_consumer(model) and not may_need_input_cast(model)  # its children hold the matrices
    x = torch.randn(2, 8, 64, dtype=BF16)
    with pytest.raises(RuntimeError, match="dtype"):  # unguarded: what gpt_oss and granitemoe did in fp32 mode
        handles = fp32_flow(model, [])
        model(x)
    for handle in reversed(handles):
        handle.remove()

    seen: dict[str, torch.dtype] = {}
    fp32_flow(model, [model.gate, model.experts])
    model.gate.register_forward_pre_hook(lambda m, args: seen.update({"gate in": args[0].dtype}))
    x.requires_grad_(True)
    y = model(x)
    assert seen["gate in"] == BF16  # the weight's dtype, cast by the guard (which runs before this probe)
    assert y.dtype == FP32  # the caller's dtype (the fp32 stream) comes back
    y.float().pow(2).mean().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_broadcast_vectors_are_not_matrices():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(1, 1, 64))

        def forward(self, x):
            return x * self.gamma

    assert not is_strict_consumer(Scale().to(BF16))


def test_fp32_parameters_kept_on_purpose_do_not_decide_the_dtype():
    """A state-space mixer keeps A_log in fp32 beside its bf16 per-head matrices (Zamba): the input must meet the
    bf16 ones."""

    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.in_proj = nn.Linear(64, 64)
            self.x_proj_weight = nn.Parameter(torch.randn(2, 16, 32))  # a stack: per-head matrices
            self.A_log = nn.Parameter(torch.zeros(2, 32, 8))

        def forward(self, x):
            h = self.in_proj(x).view(*x.shape[:-1], 2, 32).transpose(0, -2)
            return (self.x_proj_weight[:, None] @ h.transpose(-1, -2)).sum() + self.A_log.exp().sum() * 0

    mixer = Mixer().to(BF16)
    mixer.A_log.data = mixer.A_log.data.float()
    assert is_strict_consumer(mixer)
    norm = nn.LayerNorm(64).float()
    applied(install({norm: BF16}, [mixer, mixer.in_proj], "fp32"))
    seen = []
    mixer.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    assert mixer(norm(torch.randn(4, 64))).dtype == FP32
    assert seen == [BF16]


class RelativeBias(nn.Module):
    """A 2-D matrix of its own beside a child Linear, multiplied in its forward (Inkling2's relative positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64, bias=False)
        self.proj = nn.Parameter(torch.randn(64, 16))

    def forward(self, x):
        return self.linear(x) @ self.proj


class ElementwiseTable(nn.Module):
    """A 2-D parameter used elementwise beside a child Linear (a state-space A_log): fp32 input works."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64, bias=False)
        self.A_log = nn.Parameter(torch.zeros(64, 16))

    def forward(self, x):
        return self.linear(x.to(self.linear.weight.dtype)).float() - self.A_log.float().exp().sum()


def test_two_dimensional_matrices_beside_children_switch_on_the_first_dtype_failure():
    relative, table = RelativeBias().to(BF16), ElementwiseTable().to(BF16)
    assert not is_strict_consumer(relative) and may_need_input_cast(relative)
    assert may_need_input_cast(table)
    norm = nn.LayerNorm(64).float()  # the flow is fp32 where an upcast norm hands fp32 on
    applied(install({norm: BF16}, [relative.linear, table.linear], "fp32", fallback_consumers=[relative, table]))
    x = torch.randn(3, 64, dtype=FP32)
    with pytest.warns(UserWarning, match="RelativeBias cannot take a torch.float32 input"):
        assert relative(x).dtype == FP32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and none for the module that takes fp32 as it is
        assert relative(x).dtype == FP32
        assert table(x).dtype == FP32


def test_a_router_that_peft_parametrizes_is_still_a_consumer():
    """peft's LoRA on an nn.Parameter (target_parameters) moves it under `parametrizations`: the guard must still
    see the router's matrix and its dtype."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = Router(64, 4)

        def forward(self, x):
            return self.gate(x)[0]

    model = Wrapper().to(BF16)
    router = model.gate
    assert is_strict_consumer(router)
    norm = nn.LayerNorm(64).float()
    applied(install({norm: BF16}, [router], "fp32"))
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[], target_parameters=["gate.weight"]))
    seen = []
    router.register_forward_pre_hook(
        lambda m, args: seen.append((torch.nn.utils.parametrize.is_parametrized(m), args[0].dtype))
    )
    y = peft_model(torch.randn(3, 64, dtype=FP32))
    assert seen == [(True, BF16)]  # during the call the weight is parametrized (LoRA added), and the input bf16
    assert y.dtype == FP32


# ---- "layer" mode: fp32 inside each block, from inside its checkpoint ----------------------------------------------


def test_layer_mode_checkpoint_keeps_half_precision_and_the_block_sees_fp32(backend, device):
    if not bitsandbytes_supports(backend):
        pytest.skip(f"bitsandbytes 4-bit does not run on {backend}")
    targets = tiny.LORA_TARGETS["llama"]
    model = tiny.load(tiny.checkpoint("llama"), "bnb-nf4", device)
    portable_kbit.prepare(model, device, target_modules=targets, activations="layer")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    layers = model.base_model.model.model.layers
    checkpointed: list[torch.dtype] = []
    inside: list[torch.dtype] = []
    for layer in layers:
        original = layer.__dict__["_gradient_checkpointing_func"]

        def recording(function, *args, original=original, **kwargs):
            checkpointed.extend(a.dtype for a in args if isinstance(a, torch.Tensor))
            return original(function, *args, **kwargs)

        layer.__dict__["_gradient_checkpointing_func"] = recording

        def attention_inputs(module, args, kwargs):
            cos, _ = kwargs["position_embeddings"]
            inside.extend([kwargs["hidden_states"].dtype if "hidden_states" in kwargs else args[0].dtype, cos.dtype])

        layer.self_attn.register_forward_pre_hook(attention_inputs, with_kwargs=True)
    model.train()
    ids = tiny.batch(256, 16, 1, device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert math.isfinite(loss.item())
    assert checkpointed and set(checkpointed) == {BF16}, checkpointed  # what each checkpoint keeps
    assert inside and set(inside) == {FP32}, inside  # forward and recompute: the block computes in fp32


def test_an_override_calls_the_class_forward_of_the_moment():
    """FSDP2's fully_shard swaps a module's class after prepare() (and transformers' checkpointing wrapper only
    checkpoints when it is the class's own forward): an instance forward must call the class forward found at call
    time, not the one bound when it was installed."""
    from portable_kbit.patches.protocol import InstanceForward

    class Block(nn.Module):
        def forward(self, x):
            return x + 1

    class Swapped(Block):
        def forward(self, x):
            return x + 100

    block = Block()
    handle = InstanceForward(block, lambda call_previous: lambda x: call_previous(x) * 2)
    handle.apply()
    assert block(torch.zeros(1)).item() == 2
    block.__class__ = Swapped
    assert block(torch.zeros(1)).item() == 200
    handle.remove()
    assert block(torch.zeros(1)).item() == 100
