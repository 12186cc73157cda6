"""The blocked MLP as one autograd Function (patches/token_blocks/mlp.py BlockedMlp): the same step as unblocked, with
adapters inside the MLP too, and one MLP forward per block in backward, not two, under non-reentrant checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_blocks import BLOCK, assert_blocking_ran, assert_same_step, batch, build

import portable_kbit

EVERY_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def step(model, token_blocks, checkpointing, targets):
    """prepare() a copy, random LoRA weights (the same each time), one forward and backward; also how many times the
    first layer's gate projection ran."""
    model = copy.deepcopy(model)
    portable_kbit.prepare(
        model,
        target_modules=targets,
        token_blocks=token_blocks,
        use_gradient_checkpointing=checkpointing is not None,
        gradient_checkpointing_kwargs=checkpointing,
    )
    torch.manual_seed(5)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0, init_lora_weights=False))
    model.train()
    runs = []
    gate = model.get_base_model().model.layers[0].mlp.gate_proj
    gate.register_forward_hook(lambda module, args, output: runs.append(args[0].numel() // args[0].shape[-1]))
    out = model(**batch())
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return (out, grads, model), runs


CHECKPOINTING = {"non-reentrant": {"use_reentrant": False}, "reentrant": {"use_reentrant": True}, "none": None}


@pytest.mark.parametrize("checkpointing", list(CHECKPOINTING))
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], EVERY_LINEAR], ids=["attention adapters", "every linear"])
def test_same_step_as_unblocked(checkpointing, targets):
    model = build("llama")
    plain, plain_runs = step(model, None, CHECKPOINTING[checkpointing], targets)
    blocked, blocked_runs = step(model, BLOCK, CHECKPOINTING[checkpointing], targets)
    assert_same_step(plain, blocked)
    assert_blocking_ran(blocked[2], mlp_calls=1)
    assert set(blocked_runs) == {BLOCK}  # every MLP call in blocks of BLOCK tokens
    tokens = 2 * 40  # batch(): two rows of 40
    # unblocked, the MLP runs over every token in the forward and again in a checkpoint's recompute
    assert plain_runs == [tokens] * {"non-reentrant": 2, "reentrant": 2, "none": 1}[checkpointing], plain_runs
    # blocked: in the forward and once more per block in its backward; a non-reentrant recompute stops before the
    # MLP (the same count as unblocked), a reentrant one cannot stop early (one pass more)
    passes = {"non-reentrant": 2, "reentrant": 3, "none": 2}[checkpointing]
    assert sum(blocked_runs) == passes * tokens, blocked_runs
