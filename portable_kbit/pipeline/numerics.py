"""The activations mode's steps of prepare(): the dtype flow (which layers compute in fp32, from what, handing on
which dtype) and the switch of the model's attention where q/k/v reach it in fp32 or the device has no fused kernel."""

from __future__ import annotations

from torch import nn

from ..backends import Target
from ..model.hf import hf_model, input_embeddings
from ..model.index import ModelIndex
from ..model.layers import checkpointed_layers, in_every_layer
from ..model.trace import Trace
from ..patches import attention, dtype_flow
from ..patches.fp32_compute import fp32_products
from . import adapters, plan
from .transaction import Transaction


def add_dtype_flow(
    model: nn.Module,
    index: ModelIndex,
    changes: plan.Plan,
    found: Trace | None,
    activations: str,
    chunk_bytes: int,
    target: Target,
    transaction: Transaction,
) -> tuple[int, str]:
    """The dtype flow's patches (patches/dtype_flow.py); returns how many consumers got an input cast, and how the
    head computes its fp32 products ("" where none does): from bf16 matmuls where `target`'s backend says so."""
    norms = {index.modules[name]: dtype for name, dtype in changes.upcast_norms.items()}
    compute_norms = [index.modules[name] for name in changes.compute_norms]
    skip = adapters.adapter_submodules(index) | {id(m) for m in norms}
    consumers = [m for m in index.modules.values() if id(m) not in skip and dtype_flow.is_strict_consumer(m)]
    fallbacks = [m for m in index.modules.values() if id(m) not in skip and dtype_flow.may_need_input_cast(m)]
    layers = checkpointed_layers(model) if activations == "layer" else []
    half_modules = frozen_mlps(model, index, found, changes.adapter_spec) if activations == "mixed" else []
    why_not_parts = target.backend.why_no_fp32_from_bf16(target.device)
    transaction.patches.extend(
        dtype_flow.install(
            norms,
            consumers,
            activations,
            input_embeddings(model),
            chunk_bytes,
            compute_norms,
            layers,
            fallbacks,
            half_modules,
            why_not_parts is None,
        )
    )
    names = {id(m): name for name, m in index.modules.items()}
    ways: dict[str, list[str]] = {}
    for module in dtype_flow.fp32_heads(norms, consumers, activations):
        ways.setdefault(fp32_products(module, why_not_parts), []).append(names[id(module)])
    head = "; ".join(f"{_named(layers)} {way}" for way, layers in ways.items())
    return len(consumers) + len(fallbacks), head


def _named(names: list[str]) -> str:
    """'lm_head:' or '15 linear layers (lm_head, model.layers.0.mlp.up_proj, ...):' for the report."""
    if len(names) == 1:
        return f"{names[0]}:"
    return f"{len(names)} linear layers ({', '.join(sorted(names, key=len)[:2])}, ...):"


def frozen_mlps(
    model: nn.Module, index: ModelIndex, found: Trace | None, spec: adapters.AdapterSpec | None
) -> list[nn.Module]:
    """The position-wise MLPs the trace found (in every layer) with no adapter inside and nothing trainable: what
    "mixed" computes in the model's dtype. None without a trace."""
    if found is None:
        return []
    names = {id(m): n for n, m in index.modules.items()}
    traced = {names[id(m)]: m for m in found.mlps if id(m) in names}
    adapted = spec.adapted if spec is not None else []
    return [
        module
        for name, module in in_every_layer(model, traced).items()
        if not any(a.startswith(name + ".") for a in adapted) and not any(p.requires_grad for p in module.parameters())
    ]


def switch_attention(
    model: nn.Module,
    index: ModelIndex,
    target: Target,
    activations: str,
    upcast: str,
    replaced: bool,
    transaction: Transaction,
) -> attention.AttentionChoice:
    """Where q/k/v will reach attention in fp32, or the backend says attention would hold L x L scores in every mode,
    and the model's attention is transformers' sdpa: our sdpa (patches/attention.py). `replaced`: the last
    prepare()'s switch was just superseded."""
    fp32_reason = attention.fp32_inside_attention(activations, upcast)
    base = hf_model(model)
    half = plan.model_dtype(index) if activations == "mixed" else None
    choice = attention.choose(base, target.backend, target.device, fp32_reason, replaced, half)
    if choice.patch is not None:
        transaction.patches.apply(choice.patch)
        if not choice.patch.is_live():
            choice = attention.refused(base, choice)
    return choice
