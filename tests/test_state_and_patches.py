"""The two mechanisms every change goes through: ModelState (a snapshot of the modules and their configs, put back
exactly) and the patch protocol (apply; remove puts back what apply replaced, and checks the model, not a flag)."""

from __future__ import annotations

import model_state
import pytest
import torch
import transformers
from torch import nn

from portable_kbit.model.state import ModelState
from portable_kbit.patches.protocol import Hook, InstanceAttribute, InstanceForward, PatchSet


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def change_everything(model: nn.Module) -> None:
    """What a forward (or a failed prepare()) may do to a model's own state."""
    layer = model.model.layers[0]
    layer.mlp.register_forward_hook(lambda *args: None)
    layer.mlp.register_forward_pre_hook(lambda *args: None, with_kwargs=True)
    layer.mlp.forward = lambda x: x  # an instance forward
    layer.self_attn.cached = torch.zeros(2, device="meta")  # a plain tensor attribute, on meta (CTRL's table)
    layer.self_attn.scaling = 123.0  # an attribute the module had
    model.model.rotary_emb.register_buffer("inv_freq", torch.zeros(3), persistent=False)  # a buffer replaced
    model.model.register_buffer("added", torch.ones(1))  # a buffer added
    model.model.layers._modules["0"] = nn.Linear(2, 2)  # a submodule replaced (BigBird's attention switch)
    model.model.layers.append(nn.Identity())  # a submodule added
    model.train()  # every training flag
    model.config._attn_implementation_internal = "eager"  # the config (set_attn_implementation)
    model.config.use_cache = False
    model.__dict__["_loss_function"] = lambda *args, **kwargs: None


def test_model_state_puts_everything_back():
    model = tiny_llama().eval()
    before = model_state.take(model)
    layer = model.model.layers[0]
    hooks = len(layer.mlp._forward_hooks)
    state = ModelState(model)
    change_everything(model)
    assert model_state.take(model).diff(before), "the changes should show"
    state.restore()
    model_state.assert_unchanged(before, model, "ModelState.restore")
    assert model.model.layers[0] is layer and len(model.model.layers) == 2
    assert len(layer.mlp._forward_hooks) == hooks and "forward" not in layer.mlp.__dict__
    assert "cached" not in layer.self_attn.__dict__ and not model.training
    assert model.config.use_cache is True and "_loss_function" not in model.__dict__


def test_model_state_leaves_parameter_values_to_the_cast_journal():
    model = tiny_llama()
    weight = model.model.norm.weight
    state = ModelState(model)
    weight.data = weight.data.to(torch.float16)  # a cast, in place: the same Parameter object
    state.restore()
    assert model.model.norm.weight is weight and weight.dtype == torch.float16


# ---- the patch protocol ---------------------------------------------------------------------------------------------


class Doubler(nn.Module):
    def forward(self, x):
        return x + 1


def test_hook_applies_and_removes_once_or_twice():
    module = Doubler()
    hook = Hook(module, lambda m, args, out: out * 10, pre=False)
    hook.apply()
    assert module(torch.zeros(1)).item() == 10
    hook.remove()
    hook.remove()
    assert module(torch.zeros(1)).item() == 1 and not module._forward_hooks


def test_instance_forwards_stack_and_come_off_newest_first():
    module = Doubler()
    patches = PatchSet()
    first = patches.apply(InstanceForward(module, lambda previous: lambda x: previous(x) * 2))
    second = patches.apply(InstanceForward(module, lambda previous: lambda x: previous(x) * 3))
    assert module(torch.zeros(1)).item() == 6 and second.previous is first.forward
    assert module.forward.patch is second  # which patch stands there
    patches.remove()
    assert "forward" not in module.__dict__ and module(torch.zeros(1)).item() == 1


def test_a_patch_replaced_from_outside_is_left_alone():
    module = Doubler()
    forward = InstanceForward(module, lambda previous: lambda x: previous(x) * 2)
    forward.apply()
    module.forward = lambda x: x - 1  # someone else's, later
    forward.remove()
    assert module(torch.zeros(1)).item() == -1
    attribute = InstanceAttribute(module, "limit", 3)
    attribute.apply()
    module.limit = 4
    attribute.remove()
    assert module.limit == 4


def test_an_attribute_patch_puts_back_what_was_there_or_nothing():
    module = Doubler()
    module.__dict__["limit"] = 1
    patch = InstanceAttribute(module, "limit", 2)
    patch.apply()
    assert module.limit == 2
    patch.remove()
    assert module.limit == 1
    absent = InstanceAttribute(module, "other", 2)
    absent.apply()
    absent.remove()
    assert "other" not in module.__dict__


def test_supersede_removes_the_last_calls_set_and_a_snapshot_brings_it_back():
    module = Doubler()
    model = nn.Sequential(module)
    last = PatchSet()
    last.apply(InstanceForward(module, lambda previous: lambda x: previous(x) * 2))
    last.apply(Hook(module, lambda m, args, out: out + 100, pre=False))
    assert model(torch.zeros(1)).item() == 102
    state = ModelState(model)  # a repeat prepare()'s transaction
    now = PatchSet()
    now.supersede(last)
    assert model(torch.zeros(1)).item() == 1
    now.apply(InstanceForward(module, lambda previous: lambda x: previous(x) * 5))
    now.remove()  # the repeat fails: its patches come off, the snapshot puts the last call's back
    state.restore()
    assert model(torch.zeros(1)).item() == 102
    last.remove()  # and they are live again: a later call can still take them off
    assert model(torch.zeros(1)).item() == 1 and not module._forward_hooks


@pytest.mark.parametrize("pre", [True, False])
def test_hooks_keep_torchs_options(pre):
    module = Doubler()
    seen = []
    if pre:
        hook = Hook(module, lambda m, args, kwargs: seen.append(kwargs), pre=True, with_kwargs=True)
    else:
        hook = Hook(module, lambda m, args, kwargs, out: seen.append(kwargs), pre=False, with_kwargs=True)
    hook.apply()
    module(x=torch.zeros(1))
    assert seen and "x" in seen[0]
