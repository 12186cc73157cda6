"""prepare()'s attention on a model: attention that stays on a fused kernel when q/k/v are fp32, and that never
holds [heads, L, L] scores where no fused kernel takes a training call (Apple MPS).

With fp32 hidden states, q/k/v reach ``scaled_dot_product_attention`` in fp32, and transformers passes
``enable_gqa=True`` for grouped-query attention whenever there is no attention mask (batch 1, packed or padding-free
batches). On CUDA (torch <= 2.11) no fused kernel takes that call: flash takes no fp32 and the memory-efficient kernel
no GQA, so SDPA runs the math kernel, whose memory grows with L x L. The same call with k/v expanded to the query heads
and no ``enable_gqa`` runs the memory-efficient kernel.

This module registers an attention function with transformers' ``AttentionInterface`` under ``ATTENTION_NAME`` (and
sdpa's own mask function under the same name with ``AttentionMaskInterface``, so padding masks are built as for
sdpa), switched on with ``model.set_attn_implementation`` where q/k/v will be fp32, or where the backend says
attention would hold L x L scores in every mode. The function (patches/attention_call.py) is transformers'
``sdpa_attention_forward``, except for an fp32 grouped-query call that the device's Backend says the fused kernels
would refuse (k/v are expanded), and a long call that only the math kernel would take (it runs over blocks of
queries, patches/query_blocks.py, or on a memory-efficient kernel the backend asks for).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..backends import Backend
from ..constants import MISSING
from ..model.hf import call
from .attention_call import AttentionCalls, attention_forward, count_calls_of, forget_calls_of
from .dtype_flow import FP32_FLOWS
from .protocol import Patch

#: our name in transformers' attention registries (and the models' ``config._attn_implementation`` once switched)
ATTENTION_NAME = "portable_kbit_sdpa"
#: the ``activations`` modes whose hidden states reach attention in fp32: those whose adapted layers compute in fp32
FP32_ATTENTION_MODES: tuple[str, ...] = FP32_FLOWS

# set_attn_implementation writes these on configs (the second only transformers 4.x, on sub-model configs)
_CONFIG_ATTRIBUTES = ("_attn_implementation_internal", "_attn_was_changed")


def fp32_inside_attention(activations: str, upcast: str) -> str | None:
    """Why q/k/v reach attention in fp32 after prepare(), or None where they keep the model's dtype."""
    if activations in FP32_ATTENTION_MODES:
        return f"activations={activations!r} hands fp32 hidden states to attention"
    if upcast == "peft":
        return "upcast='peft' makes the embeddings fp32, and the hidden states with them"
    return None


def register() -> None:
    """Register the attention function and sdpa's mask function under ATTENTION_NAME (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


# ---- switching a model ----------------------------------------------------------------------------------------------


def attention_configs(model: nn.Module) -> list[Any]:
    """Every config whose attention implementation ``set_attn_implementation`` may set: those of the transformers
    models in ``model`` (the top one, sub-models) and their sub-configs, at any depth, each once."""
    from transformers import PreTrainedModel

    seen: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", None) or {}:
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                stack.append(sub)
    return list(seen.values())


@dataclasses.dataclass
class ConfigSnapshot:
    """The attention attributes of a model's configs, exactly, to put back."""

    values: list[tuple[Any, dict[str, Any]]]

    @classmethod
    def take(cls, model: nn.Module) -> ConfigSnapshot:
        return cls(
            [(c, {a: c.__dict__.get(a, MISSING) for a in _CONFIG_ATTRIBUTES}) for c in attention_configs(model)]
        )

    def restore(self) -> None:
        for config, attributes in self.values:
            for name, value in attributes.items():
                if value is MISSING:
                    config.__dict__.pop(name, None)
                else:
                    config.__dict__[name] = value

    def configs(self) -> list[Any]:
        return [config for config, _ in self.values]

    def top(self) -> Any:
        """The implementation recorded for the first (the top model's) config."""
        value = self.values[0][1]["_attn_implementation_internal"] if self.values else None
        return None if value is MISSING else value


class AttentionImplementation(Patch):
    """Our attention implementation on a transformers model, as a patch: ``remove()`` puts back the implementation
    the model had, unless something else has changed it since (the user's later choice stands)."""

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.original = ConfigSnapshot([])
        # fp32 calls compute in compute_dtype (None: fp32); the paths its calls take, counted while it stands
        self.calls = AttentionCalls(compute_dtype)

    def apply(self) -> None:
        before = ConfigSnapshot.take(self.model)
        # ours without a patch of ours (a copy of a prepared model): it stood for transformers' sdpa
        self.original = ConfigSnapshot([(c, _ours_as_sdpa(v)) for c, v in before.values])
        register()
        call(self.model, "set_attn_implementation", ATTENTION_NAME)
        if not self.is_live():
            before.restore()
            return
        count_calls_of(self.original.configs(), self.calls)

    def is_live(self) -> bool:
        configs = self.original.configs()
        return bool(configs) and all(c._attn_implementation == ATTENTION_NAME for c in configs)

    def remove(self) -> None:
        forget_calls_of(self.original.configs(), self.calls)
        if self.is_live():
            self.original.restore()


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """What prepare() does to the model's attention: the implementation after the call, why, and the patch that
    switches it (None: left as it is)."""

    implementation: str | None
    reason: str
    patch: AttentionImplementation | None = None
    note: str | None = None  # for the report's notes: a model left as it was although its attention is fp32


def _left_alone(implementation: Any, fp32_reason: str) -> tuple[str, str]:
    """(reason, note) for a model whose attention is not transformers' sdpa."""
    if implementation == "eager":
        why = (
            "eager attention left as it is: it keeps the L x L scores, in fp32 here, whatever is done; "
            "model.set_attn_implementation('sdpa') before prepare() lets portable_kbit keep fp32 attention fused"
        )
    elif isinstance(implementation, str) and implementation.startswith("flash_attention"):
        why = f"{implementation} left as it is: transformers casts fp32 q/k/v to half precision for it"
    else:
        why = f"attention implementation {implementation!r} left as it is (only transformers' 'sdpa' is switched)"
    return why, f"{fp32_reason}; {why}"


def _ours_as_sdpa(attributes: dict[str, Any]) -> dict[str, Any]:
    if attributes["_attn_implementation_internal"] == ATTENTION_NAME:
        return {**attributes, "_attn_implementation_internal": "sdpa"}
    return attributes


def choose(
    model: nn.Module,
    backend: Backend,
    device: torch.device,
    fp32_reason: str | None,
    replaced: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> AttentionChoice:
    """What to do with a transformers model's attention (a PeftModel's base model): our implementation where its
    attention is transformers' sdpa and q/k/v will be fp32 (``fp32_reason``), or the backend says attention would hold
    L x L scores in every mode; else it is left as it is. `replaced`: the last prepare()'s switch was just removed (the
    reason says so). `compute_dtype`: fp32 calls compute in this dtype ("mixed"). Changes nothing: the choice's patch
    does, once applied."""
    configs = attention_configs(model)
    implementations = [c._attn_implementation for c in configs]
    current = implementations[0] if implementations else None
    scores_reason = backend.attention_holds_scores(device)
    why = "; ".join(reason for reason in (fp32_reason, scores_reason) if reason)
    if not why:
        reason = "q/k/v keep the model's dtype: transformers' attention as it is"
        if replaced:
            reason += f" (the fp32 attention of the last prepare() is removed: back to {current!r})"
        return AttentionChoice(current, reason)
    if not configs or not hasattr(model, "set_attn_implementation"):
        return AttentionChoice(current, f"{why}; not a transformers model: attention left as it is")
    if any(i not in ("sdpa", ATTENTION_NAME) for i in implementations):
        odd = next(i for i in implementations if i not in ("sdpa", ATTENTION_NAME))
        reason, note = _left_alone(odd, why)
        return AttentionChoice(current, reason, note=note)
    can_switch = getattr(type(model), "_can_set_attn_implementation", None)
    if current != ATTENTION_NAME and can_switch is not None and not can_switch():
        reason = f"{type(model).__name__} cannot switch its attention implementation: sdpa left as it is"
        return AttentionChoice(current, f"{why}; {reason}", note=f"{why}; {reason}")
    detail = backend.fp32_attention if fp32_reason else f"{backend.name}: long calls as the backend says"
    if fp32_reason and compute_dtype is not None:
        half = str(compute_dtype).removeprefix("torch.")
        detail = f"q/k/v cast to {half} for the half-precision kernels, output back in fp32"
        if scores_reason:
            detail += f"; {backend.name}: long calls as the backend says"
    return AttentionChoice(ATTENTION_NAME, f"{why}; {detail}", AttentionImplementation(model, compute_dtype))


def refused(model: nn.Module, choice: AttentionChoice) -> AttentionChoice:
    """The choice once its patch was applied and the model did not take our implementation (left as it was)."""
    current = next((c._attn_implementation for c in attention_configs(model)), None)
    why = choice.reason.split("; ")[0]
    reason = f"{type(model).__name__} did not take the attention implementation {ATTENTION_NAME!r}: left as it was"
    return AttentionChoice(current, f"{why}; {reason}", note=f"{why}; {reason}")
