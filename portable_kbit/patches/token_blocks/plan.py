"""What token blocks cover and how many tokens per block, decided from the trace before any change; and the
patches that put them on the model."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ...backends import Backend
from ...model.hf import hf_model, loss_function
from ...model.layers import layer_pattern, same_kind
from ...model.logit_transform import LogitTransform
from ...model.trace import MlpCandidate, Trace
from ..protocol import InstanceForward, Patch
from .counts import NORMS, BlockedCalls
from .head_loss import HeadAndLoss
from .mlp import blocked_forward, collector_var

AUTO = "auto"


def check_option(value: Any) -> None:
    """``token_blocks`` must be None, "auto" or a positive int (tokens per block); ValueError otherwise."""
    if value is None or (isinstance(value, str) and value == AUTO):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"token_blocks={value!r} is not valid: use 'auto' (the backend's block size, only where a call is longer "
            "than one block), a positive int (tokens per block) or None (no token blocks)"
        )


@dataclasses.dataclass
class BlocksPlan:
    """What prepare() blocks, and how many tokens per block."""

    size: int  # tokens per block of the head and loss
    source: str  # "argument", "backend default", "shrunk by memory pressure"
    head: nn.Module | None  # the output head whose logits and loss run in blocks (None: left alone)
    head_name: str | None
    transform: LogitTransform | None
    mlps: dict[str, MlpCandidate]  # name -> how to block it
    left_alone: dict[str, str]  # name or part -> why
    mlp_size: int  # tokens per block of the MLPs (and of the norms)
    mlp_whole_up_to: int  # MLP calls of up to this many tokens run whole (0: only those of one block or fewer)
    #: the norms over the hidden width, by name: blocked as the MLPs are, so that their temporaries (fp32 in most:
    #: RMSNorm computes in fp32 whatever its dtype) exist for one block at a time, in backward too
    norms: dict[str, nn.Module] = dataclasses.field(default_factory=dict)


def build(
    model: nn.Module,
    found: Trace,
    token_blocks: int | str,
    backend: Backend,
    headroom: int | None,
    unified: bool,
    norms: dict[str, nn.Module] | None = None,
) -> BlocksPlan:
    """Decide what to block from the trace. For "auto", the backend's block sizes for the head and for the MLPs
    (shrunk under memory pressure: `headroom`), and up to how many tokens an MLP call runs whole. `norms`: the
    model's norms; those over the hidden width that are plain modules with one weight run in blocks too.

    Raises ValueError (before any change) when an explicit block size is asked for and the model's head and loss
    cannot be blocked: its logits go through a transform that cannot be replayed on blocks, or the trace failed.
    """
    base = hf_model(model)
    names = {id(m): n for n, m in model.named_modules()}
    left_alone: dict[str, str] = {}
    explicit = token_blocks != AUTO
    problem = None
    if found.error is not None:
        problem = f"a trace of its forward with labels failed ({found.error})"
    elif found.head is not None:
        problem = found.head_problem or _loss_problem(base)
    if problem is not None and explicit:
        raise ValueError(
            f"token_blocks={token_blocks!r}: the output head and loss of this model cannot run in token blocks: "
            f"{problem}. Pass token_blocks='auto' to block only what can be blocked (the report says what), or "
            "token_blocks=None."
        )
    head = found.head if problem is None else None
    head_name = names.get(id(found.head)) if found.head is not None else None
    if head is None:
        left_alone[head_name or "output head"] = problem or found.head_problem or "no output head"

    mlps = _expand_mlps(model, base, found, names, left_alone)
    if not mlps and not any(key != (head_name or "output head") for key in left_alone):
        left_alone["MLPs"] = (
            "no module takes a norm's output alone and returns its shape (the feed-forward may be inline in the "
            "decoder layer, as in OPT)"
        )
    mlp_widths = [4 * _widest_leaf(candidate.module) for candidate in mlps.values()]
    widths = ([4 * _out_features(head)] if head is not None else []) + mlp_widths
    if explicit:
        assert isinstance(token_blocks, int)
        block, source, mlp_block, mlp_whole = token_blocks, "argument", token_blocks, 0
    else:
        block = backend.token_block_size(max(widths, default=1), headroom, unified)
        plenty = backend.token_block_size(max(widths, default=1), None, unified)
        source = "backend default" if block == plenty else "shrunk by memory pressure"
        mlp_block, mlp_whole = block, 0
        if mlps:
            hidden = _hidden_width(base, mlps)
            mlp_block = backend.token_block_size(max(mlp_widths), headroom, unified, hidden)
            if mlp_block == backend.token_block_size(max(mlp_widths), None, unified, hidden):  # not under pressure
                mlp_whole = backend.mlp_whole_up_to(hidden, unified)
    transform = found.transform if head else None
    width = _hidden_width(base, mlps)
    blocked_norms = {name: norm for name, norm in (norms or {}).items() if _plain_norm(norm, width)}
    return BlocksPlan(block, source, head, head_name, transform, mlps, left_alone, mlp_block, mlp_whole, blocked_norms)


def patches(model: nn.Module, plan: BlocksPlan, counts: BlockedCalls) -> list[Patch]:
    """The blocked head/loss (hooks and loss_function) and the blocked MLP forwards, as patches to apply."""
    out: list[Patch] = []
    if plan.head is not None and plan.transform is not None:
        base = hf_model(model)
        original = loss_function(base)
        if original is None:  # build() checked it: a bug if it is gone
            raise RuntimeError("the model's loss_function disappeared between planning and installing token blocks")
        original = getattr(original, "blocked_loss_of", original)
        out += HeadAndLoss(base, plan.size, plan.transform, original, counts).patches()
    for candidate in plan.mlps.values():
        out.append(
            InstanceForward(
                candidate.module,
                blocked_forward(candidate.module, plan.mlp_size, candidate, counts, plan.mlp_whole_up_to),
            )
        )
    for norm in plan.norms.values():
        # a norm is position-wise, as an MLP: its fp32 temporaries (and, in backward, those of its gradient) for one
        # block at a time, its forward run once more in backward
        candidate = MlpCandidate(norm, (), 0)
        out.append(
            InstanceForward(norm, blocked_forward(norm, plan.mlp_size, candidate, counts, plan.mlp_whole_up_to, NORMS))
        )
    return out


def _plain_norm(module: nn.Module, hidden: int) -> bool:
    """A leaf module with one weight of the hidden width that normalizes over the last dimension (RMSNorm, LayerNorm
    of the hidden states): what the blocks can run row by row. Not a norm of each head (q_norm: rows of heads x tokens
    would make blocks of a fraction of the tokens), nor torch's norms over channels (batch, group, instance norms)."""
    if isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)):
        return False
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
        return False
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or any(True for _ in module.children()):
        return False
    return weight.dim() == 1 and weight.numel() == hidden


def recorded_classes(model: nn.Module) -> tuple[tuple[type, ...], tuple[str, ...]]:
    """Module classes (and class-name suffixes) whose outputs transformers records through hooks for a model
    output other than hidden states and attentions: MoE routers, for the auxiliary loss."""
    classes: list[type] = []
    names: list[str] = []
    for module in model.modules():
        spec = getattr(type(module), "_can_record_outputs", None)
        if not isinstance(spec, dict):
            continue
        for key, value in spec.items():
            if key in ("hidden_states", "attentions", "cross_attentions"):
                continue
            for recorder in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(recorder, type):
                    classes.append(recorder)
                    continue
                target = getattr(recorder, "target_class", None)
                if isinstance(target, type):
                    classes.append(target)
                class_name = getattr(recorder, "class_name", None)
                if isinstance(class_name, str):
                    names.append(class_name)
    return tuple(classes), tuple(names)


def _loss_problem(model: nn.Module) -> str | None:
    prop = getattr(type(model), "loss_function", None)
    if not isinstance(prop, property) or prop.fset is None:
        return "this transformers version has no settable loss_function"
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:
        return "this transformers version has no loss mapping"
    current = loss_function(model)
    current = getattr(current, "blocked_loss_of", current)  # an earlier prepare()'s blocked loss
    causal = LOSS_MAPPING.get("ForCausalLM")
    if current is not causal:
        name = getattr(current, "__name__", type(current).__name__)
        return f"its loss_function is {name}, not transformers' ForCausalLMLoss, whose blocked form this is"
    return None


def _expand_mlps(
    model: nn.Module, base: nn.Module, found: Trace, names: dict[int, str], left_alone: dict[str, str]
) -> dict[str, MlpCandidate]:
    """The traced MLPs (one layer of each kind) applied to every layer: same place in the layer, same structure."""
    recorded, recorded_names = recorded_classes(base)
    merging = collector_var() is not None
    by_kind: dict[Any, MlpCandidate] = {}  # by model.layers.same_kind
    for module, candidate in found.mlps.items():
        name = names.get(id(module))
        if name is None:
            continue
        pattern = layer_pattern(name)
        if candidate.reason is None:
            # a record on the block itself is taken once, around the blocked forward (its tuple output merged);
            # one on a submodule (a router) is taken once per block and must be merged back
            records = [
                type(m).__name__
                for n, m in module.named_modules()
                if n and (isinstance(m, recorded) or any(f"{name}.{n}".endswith(s) for s in recorded_names))
            ]
            if records and not merging:
                candidate.reason = (
                    f"transformers records the outputs of its {records[0]} (router logits for the auxiliary loss) "
                    "per call, and this transformers version keeps those records out of reach: blocks would "
                    "split them"
                )
            candidate.records = bool(records)
        if candidate.reason is not None:
            left_alone[pattern] = candidate.reason
            continue
        by_kind[same_kind(name, module)] = candidate
    return {
        name: dataclasses.replace(by_kind[same_kind(name, module)], module=module)
        for name, module in model.named_modules()
        if name and same_kind(name, module) in by_kind
    }


def _hidden_width(model: nn.Module, mlps: dict[str, MlpCandidate]) -> int:
    """The hidden width: the config's hidden size, else the first MLP's first layer's input features (1: unknown)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int):
        return hidden
    first = next(iter(mlps.values()), None)
    for module in first.module.modules() if first is not None else ():
        width = getattr(module, "in_features", None)
        if isinstance(width, int):
            return width
    return 1


def _out_features(module: nn.Module) -> int:
    width = getattr(module, "out_features", None)
    if isinstance(width, int):
        return width
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 1


def _widest_leaf(module: nn.Module) -> int:
    return max((_out_features(m) for m in module.modules() if not any(True for _ in m.children())), default=1)
