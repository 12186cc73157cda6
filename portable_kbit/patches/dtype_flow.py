"""Forward hooks that keep dtypes consistent once some norms are fp32.

Two rules, both explicit rather than left to dtype promotion inside each architecture's norm:
- an upcast norm computes in its (fp32) weight dtype and hands on fp32 ("fp32" activations, peft's numerics) or its
  original dtype ("native", the lowest activation memory);
- a consumer whose kernel wants its input in its weight dtype (nn.Linear such as lm_head, Conv1D, LayerNorm, an
  optimum-quanto layer, adapted or not; and any module that computes with matrices of its own outside those types:
  MoE routers and grouped experts kept as nn.Parameters, custom projections) computes in that dtype and returns the
  dtype it was given, as bitsandbytes layers already do, so the flow stays the same on every quantizer.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D  # GPT-2 style transposed linear

from ..model.hf import weight_of
from ..model.quantized import handles_its_own_input_dtype, quantization_kind

HALF_DTYPES = (torch.float16, torch.bfloat16)
#: activations modes in which adapted layers compute in fp32 (the upcast norms hand fp32 on)
FP32_FLOWS = ("fp32", "layer")

STRICT_TYPES: tuple[type, ...] = (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Conv1d, nn.Conv2d, Conv1D)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _replace_first(value: Any, tensor: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return tensor
    return type(value)((tensor, *value[1:])) if isinstance(value, tuple) else [tensor, *value[1:]]


def _weight_dtype(module: nn.Module) -> torch.dtype | None:
    weight = getattr(module, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point else None


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's own parameters, and the originals of its parametrized ones (peft's LoRA on an nn.Parameter
    registers a torch parametrization: the parameter then lives under `module.parametrizations`)."""
    tensors: list[torch.Tensor] = [p for p in module._parameters.values() if p is not None]
    if parametrize.is_parametrized(module):
        for parametrization in cast(nn.ModuleDict, module.parametrizations).values():
            tensors += [p for p in parametrization._parameters.values() if p is not None]
    return tensors


def _own_matrices(module: nn.Module) -> list[torch.Tensor]:
    """The module's own floating-point matrices: parameters with two or more dimensions larger than 1 (a matrix, a
    stack of per-expert or per-head matrices; not a broadcast vector such as a [1, 1, hidden] scale)."""
    return [
        p
        for p in _own_tensors(module)
        if sum(size > 1 for size in p.shape) >= 2 and p.dtype.is_floating_point and quantization_kind(p) is None
    ]


def _has_matrix_descendants(module: nn.Module) -> bool:
    return any(
        name and not name.startswith("parametrizations") and _own_matrices(descendant)
        for name, descendant in module.named_modules()
    )


def _matrix_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype a module that computes with its own matrices wants its input in (None: not such a module).

    Such a module owns floating-point matrices: a router's [experts, hidden] weight, grouped experts' [experts,
    hidden, ffn] stacks, a custom projection. Where no descendant holds matrices, they can only be used in its own
    forward, typically in F.linear / matmul / bmm / einsum, which refuse an fp32 input with a bf16 weight. A module
    with matrix-holding descendants (a Mamba mixer, an attention block) counts only if it owns a stack of matrices
    (three or more dimensions: per-head or per-expert matrices); whether it multiplies by a 2-D one (a relative
    position projection) or uses it elementwise (a state-space A_log) shows only when it runs (see
    _fallback_forward), and casting its input changes what its descendants get.
    """
    own = _own_matrices(module)
    if own and _has_matrix_descendants(module):
        own = [p for p in own if p.dim() >= 3]
    return _common_dtype(own) if own else None


def may_need_input_cast(module: nn.Module) -> bool:
    """A module with 2-D matrices of its own and matrix-holding descendants: whether its forward takes an fp32 input
    shows when it runs (it gets _fallback_forward)."""
    if handles_its_own_input_dtype(module) or isinstance(module, (nn.Embedding, *STRICT_TYPES)):
        return False
    return bool(_own_matrices(module)) and _matrix_dtype(module) is None and _has_matrix_descendants(module)


def _fallback_forward(module: nn.Module) -> Callable[[Forward], Forward]:
    """Runs the module as it is; the first time it fails on a dtype mismatch with a floating-point input of a dtype
    other than its matrices', the call is repeated with that input in the matrices' dtype (its output cast back, as
    InputDtypeGuard does), and so is every later call. A failed call has returned nothing, so nothing of it is kept;
    the switch is reported once as a warning."""
    switched = False

    def make(call_previous: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            nonlocal switched
            if not switched:
                try:
                    return call_previous(*args, **kwargs)
                except RuntimeError as error:
                    dtype = _common_dtype(_own_matrices(module))
                    x = _first_tensor(args)
                    if dtype is None or x is None or not x.is_floating_point() or x.dtype == dtype:
                        raise
                    if not any(phrase in str(error) for phrase in DTYPE_MISMATCH):
                        raise
                    switched = True
                    warnings.warn(
                        f"portable_kbit: {type(module).__name__} cannot take a {x.dtype} input beside its {dtype} "
                        f"parameters ({error}); it computes in {dtype} from now on, its output cast back",
                        stacklevel=2,
                    )
            dtype = _common_dtype(_own_matrices(module))
            x = _first_tensor(args)
            if dtype is None or x is None or not x.is_floating_point() or x.dtype == dtype:
                return call_previous(*args, **kwargs)
            output = call_previous(*_replace_first(args, x.to(dtype)), **kwargs)
            y = _first_tensor(output)
            return _replace_first(output, y.to(x.dtype)) if y is not None and y.is_floating_point() else output

        return forward

    return make


#: what torch's kernels say when two operands' dtypes differ
DTYPE_MISMATCH = ("same dtype", "expected scalar type", "dtypes must be the same", "mixed dtype")


def _common_dtype(tensors: list[torch.Tensor]) -> torch.dtype | None:
    """The one dtype of `tensors`; where fp32 ones sit beside one half-precision dtype (a model that keeps a few
    parameters in fp32 on purpose, such as a state-space A_log), the half-precision one: that is what an fp32 input
    cannot meet."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        dtypes -= {torch.float32}
    return dtypes.pop() if len(dtypes) == 1 else None


def _compute_dtype(module: nn.Module) -> torch.dtype | None:
    """A leaf layer with quantized (integer) weights that dequantizes to a `compute_dtype` (HQQLinear and the like):
    its matmul needs the input in that dtype."""
    dtype = getattr(module, "compute_dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or any(True for _ in module.children()):
        return None
    quantized = any(not p.dtype.is_floating_point for p in module.parameters(recurse=False))
    return dtype if quantized else None


class UpcastNormFlow:
    """Hooks for one upcast norm: input cast to the dtype it computes in, output cast to the flow dtype.

    The compute dtype is fp32 for a norm computed in fp32 at call time, else (None) its weight's dtype at call time
    (fp32 once its parameters were cast).
    """

    def __init__(self, flow_dtype: torch.dtype, compute_dtype: torch.dtype | None = None) -> None:
        self.flow_dtype = flow_dtype
        self.compute_dtype = compute_dtype

    def before(self, module: nn.Module, args: tuple) -> tuple | None:
        x = _first_tensor(args)
        dtype = self.compute_dtype or _weight_dtype(module)
        if x is None or dtype is None or not x.is_floating_point() or x.dtype == dtype:
            return None
        return _replace_first(args, x.to(dtype))

    def after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        y = _first_tensor(output)
        if y is None or not y.is_floating_point() or y.dtype == self.flow_dtype:
            return None
        return _replace_first(output, y.to(self.flow_dtype))


def _consumer_dtype(module: nn.Module) -> torch.dtype | None:
    if isinstance(module, STRICT_TYPES):
        return _weight_dtype(module) or _compute_dtype(module)
    return _compute_dtype(module) or _matrix_dtype(module)


class InputDtypeGuard:
    """Hooks for a dtype-strict consumer: compute in the weight dtype, return the caller's dtype.

    The input is the first positional tensor, else (a module called with keywords only) the first floating-point
    tensor among the keyword arguments. Other arguments (routing weights, masks) are left as they are.
    """

    def __init__(self) -> None:
        self.pending: list[torch.dtype | None] = []

    def before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        dtype = _consumer_dtype(module)
        x = _first_tensor(args)
        key = None
        if x is None and not args:
            key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
            x = kwargs[key] if key is not None else None
        if x is None or dtype is None or not x.is_floating_point() or x.dtype == dtype:
            self.pending.append(None)
            return None
        self.pending.append(x.dtype)
        if key is not None:
            return args, {**kwargs, key: x.to(dtype)}
        return _replace_first(args, x.to(dtype)), kwargs

    def after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        caller_dtype = self.pending.pop() if self.pending else None
        y = _first_tensor(output)
        if caller_dtype is None or y is None or not y.is_floating_point():
            return None
        return _replace_first(output, y.to(caller_dtype))


def is_strict_consumer(module: nn.Module) -> bool:
    """A layer whose kernel fails (or silently misbehaves) on an input dtype other than its weight's: torch's layers
    with a weight (nn.Linear, Conv1D, LayerNorm ...), a quantized layer that dequantizes to a compute dtype, or a
    module that computes with matrices of its own (see _matrix_dtype). Embeddings take indices: never."""
    if handles_its_own_input_dtype(module) or isinstance(module, nn.Embedding):
        return False
    return _consumer_dtype(module) is not None


class FrozenLinearInFp32(torch.autograd.Function):
    """y = x W^T + b in fp32 for a frozen fp16/bf16 W without an fp32 copy of W: the weight is upcast one block of
    rows at a time, in the forward and again in the backward (only the half-precision parameter is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.rows = rows
        out = x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
        if x.numel() == 0:  # no tokens (the stand-in call of token blocks): no weight block to upcast
            return out
        for start in range(0, weight.shape[0], rows):
            out[..., start : start + rows] = torch.nn.functional.linear(x, weight[start : start + rows].float())
        if bias is not None:
            out += bias.float()
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros(*grad_out.shape[:-1], weight.shape[1], dtype=torch.float32, device=grad_out.device)
            for start in range(0, weight.shape[0], ctx.rows):
                grad_x += grad_out[..., start : start + ctx.rows] @ weight[start : start + ctx.rows].float()
        return grad_x, None, None, None


Forward = Callable[..., Any]


def _override_of(forward: Forward | None) -> ForwardOverride | None:
    handle = getattr(forward, "override", None)
    return handle if isinstance(handle, ForwardOverride) else None


def _class_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return type(module).forward(module, *args, **kwargs)


class ForwardOverride:
    """An instance-level forward (a removable handle, like a hook's): removing it restores what was there before.

    `make_forward(call_previous)` builds the new forward around the one it replaces: an instance forward that was
    there (accelerate's device hooks, another override of this call), else the class's. An override of an earlier
    prepare() that this call supersedes (`superseded`) is skipped: the new one wraps what that one wrapped.
    """

    def __init__(self, module: nn.Module, make_forward: Callable[[Forward], Forward]) -> None:
        self.module = module
        self.superseded = False
        self._make_forward = make_forward
        current = module.__dict__.get("forward")
        while (older := _override_of(current)) is not None and older.superseded:
            current = older.previous
        self._wrap(current)

    def _wrap(self, current: Forward | None) -> None:
        self.previous: Forward | None = current
        # the class's forward looked up at call time: FSDP2's fully_shard swaps the module's class after prepare()
        # (and transformers' checkpointing wrapper checkpoints only when it is the class's own forward)
        call_previous = current if current is not None else functools.partial(_class_forward, self.module)
        forward = self._make_forward(call_previous)
        forward.override = self  # type: ignore[attr-defined]  # a function attribute: finds this handle again
        self.forward = forward
        self.module.__dict__["forward"] = forward

    def rewrap(self) -> None:
        """Wrap what stands there now: something outside replaced the instance forward (transformers' kernelize)."""
        self._wrap(self.module.__dict__.get("forward"))

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is not self.forward:
            return  # a later override replaced this one and restores the original itself
        if self.previous is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.previous


def rewrap_replaced(overrides: Sequence[ForwardOverride]) -> None:
    """Put back the overrides whose module's forward was replaced from outside, in the order they were made (one
    wrapping another stays so); a module whose newest override still stands is left alone."""
    by_module: dict[nn.Module, list[ForwardOverride]] = {}
    for override in overrides:
        by_module.setdefault(override.module, []).append(override)
    for module, stack in by_module.items():
        if module.__dict__.get("forward") is not stack[-1].forward:
            for override in stack:
                override.rewrap()


_MISSING = object()


class AttributeOverride:
    """An instance attribute set by prepare() (the model's loss_function, set_use_kernels), as a removable handle:
    removing it restores what was there before, unless a later prepare() replaced it (that one restores the original
    itself). `value` must take attributes: it is given `replaced`, what it replaced."""

    def __init__(self, obj: nn.Module, attribute: str, value: Any) -> None:
        self.obj, self.attribute, self.value = obj, attribute, value
        current = obj.__dict__.get(attribute, _MISSING)
        self.previous = getattr(current, "replaced", current)
        value.replaced = self.previous
        obj.__dict__[attribute] = value

    def remove(self) -> None:
        if self.obj.__dict__.get(self.attribute, _MISSING) is not self.value:
            return
        if self.previous is _MISSING:
            self.obj.__dict__.pop(self.attribute, None)
        else:
            self.obj.__dict__[self.attribute] = self.previous


def computes_in_fp32(module: nn.Module) -> bool:
    """A plain nn.Linear with a frozen half-precision weight (lm_head): it can take fp32 in and give fp32 out."""
    weight = getattr(module, "weight", None)
    return (
        type(module).forward is nn.Linear.forward
        and isinstance(weight, torch.Tensor)
        and type(weight) in (nn.Parameter, torch.Tensor)
        and weight.dtype in (torch.float16, torch.bfloat16)
        and not weight.requires_grad
    )


def _fp32_linear_forward(module: nn.Module, chunk_bytes: int, cast_input: bool) -> Callable[[Forward], Forward]:
    """lm_head in fp32 from its half-precision weight; `cast_input`: a half-precision input is computed in fp32 too
    ("layer" mode, whose stream between blocks is half precision), giving fp32 logits as in "fp32" mode."""

    def make(call_previous: Forward) -> Forward:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            weight = weight_of(module)
            if cast_input and x.dtype in HALF_DTYPES:
                x = x.float()
            if x.dtype == torch.float32 and weight.dtype != torch.float32 and not weight.requires_grad:
                rows = max(1, chunk_bytes // (4 * weight.shape[1]))
                return FrozenLinearInFp32.apply(x, weight, getattr(module, "bias", None), rows)
            if x.is_floating_point() and x.dtype != weight.dtype:  # as InputDtypeGuard: compute in the weight dtype
                return call_previous(x.to(weight.dtype), *args, **kwargs).to(x.dtype)
            return call_previous(x, *args, **kwargs)

        return forward

    return make


@contextlib.contextmanager
def parameters_in_fp32(module: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """For the duration of one call, the module's half-precision tensors `names` read as fp32 copies.

    A bf16/fp16 value is exact in fp32, so the norm computes exactly as with an fp32 parameter, without one: no new
    bytes between calls and no dtype change that a wrapper (FSDP), a checkpoint or an optimizer can see. Each name is
    swapped where attribute lookup finds it: the instance `__dict__` first (FSDP1 sets the unsharded views there
    during forward, keeping the sharded parameter in `_parameters`), else `_parameters`.
    """
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for name in names:
            stores: tuple[dict[str, Any], ...] = (module.__dict__, module._parameters)
            for store in stores:
                value = store.get(name)
                if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES:
                    store[name] = value.float()
                    swapped.append((store, name, value))
                    break
        yield
    finally:
        for store, name, value in reversed(swapped):
            store[name] = value


def _fp32_compute_forward(module: nn.Module) -> Callable[[Forward], Forward]:
    names = [name for name, p in module._parameters.items() if p is not None and p.is_floating_point()]

    def make(call_previous: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            with parameters_in_fp32(module, names):
                return call_previous(*args, **kwargs)

        return forward

    return make


def checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of "layer" mode: transformers' gradient-checkpointed layers (the decoder layers); for a model without
    that class, the modules of its longest nn.ModuleList (the layer stack)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers: list[nn.Module] = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    except ImportError:  # transformers before the class existed
        layers = []
    if layers:
        return layers
    longest: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(longest):
            longest = list(module)
    return longest


def _half_to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in HALF_DTYPES else value
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_half_to_fp32(v) for v in value)
    return value


def _in_fp32(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    return tuple(_half_to_fp32(a) for a in args), {k: _half_to_fp32(v) for k, v in kwargs.items()}


def _checkpoints_its_forward(block: nn.Module) -> bool:
    """Whether this call of a transformers layer will checkpoint its class forward rather than its __call__.

    transformers' GradientCheckpointingLayer checkpointed ``__call__`` (hooks and an instance forward inside the
    checkpoint) until it moved to wrapping the class's ``forward`` (module hooks and instance forwards stay outside, so
    that FSDP2's do not run twice); the wrapper checkpoints when these flags hold."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    if not isinstance(block, GradientCheckpointingLayer) or "__call__" in GradientCheckpointingLayer.__dict__:
        return False
    return bool(getattr(block, "gradient_checkpointing", False)) and block.training and torch.is_grad_enabled()


def _checkpoint_in_fp32(checkpoint: Callable[..., Any]) -> Callable[..., Any]:
    """A checkpoint function whose checkpointed call gets its half-precision inputs in fp32: the cast runs inside
    the checkpoint (in the forward and again in the recompute), so the checkpoint keeps the half-precision input."""

    def checkpoint_in_fp32(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def run(*inputs: Any) -> Any:
            if isinstance(function, functools.partial):
                bound, keywords = _in_fp32(function.args, function.keywords)
                return function.func(*bound, *_in_fp32(inputs, {})[0], **keywords)
            return function(*_in_fp32(inputs, {})[0])

        return checkpoint(run, *args, **kwargs)

    return checkpoint_in_fp32


def _block_in_fp32(block: nn.Module) -> Callable[[Forward], Forward]:
    """ "layer" mode: a block computes as in "fp32" mode. Its half-precision inputs (the hidden states, and what the
    model computed once for every layer in its dtype: an additive attention mask, ALiBi biases, rotary cos/sin) are
    cast to fp32 where its computation starts, inside its gradient checkpoint, so that the checkpoint keeps the
    half-precision input (the point of this mode) and no op in the block meets two dtypes (a post-norm block feeds
    its input straight to attention; some blocks mix their input with fp32 results in a matmul)."""

    def make(call_previous: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            checkpoint = block.__dict__.get("_gradient_checkpointing_func")
            if checkpoint is not None and _checkpoints_its_forward(block):
                block.__dict__["_gradient_checkpointing_func"] = _checkpoint_in_fp32(checkpoint)
                try:
                    return call_previous(*args, **kwargs)
                finally:
                    block.__dict__["_gradient_checkpointing_func"] = checkpoint
            args, kwargs = _in_fp32(args, kwargs)
            return call_previous(*args, **kwargs)

        return forward

    return make


def _block_output_to(dtype: torch.dtype) -> Callable[[nn.Module, tuple, Any], Any]:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        y = _first_tensor(output)
        if y is None or y.dtype != torch.float32:
            return None
        return _replace_first(output, y.to(dtype))

    return hook


def _embedding_output_to_fp32(module: nn.Module, args: tuple, output: Any) -> Any:
    return (
        output.float()
        if isinstance(output, torch.Tensor) and output.dtype in (torch.float16, torch.bfloat16)
        else None
    )


def install(
    upcast_norms: dict[nn.Module, torch.dtype],
    consumers: list[nn.Module],
    activations: str,
    input_embeddings: nn.Module | None = None,
    chunk_bytes: int = 64 << 20,
    compute_norms: Sequence[nn.Module] = (),
    blocks: Sequence[nn.Module] = (),
    fallback_consumers: Sequence[nn.Module] = (),
) -> list:
    """Register the hooks; returns their handles (removing them, newest first, restores the original forwards).

    Norms in `compute_norms` compute in fp32 at call time from their half-precision parameters. With "fp32"
    activations the embedding output is fp32 too (as with peft, whose embedding weight is fp32: the residual stream
    and the rotary cos/sin follow its dtype), and a frozen half-precision nn.Linear consumer (lm_head) computes in fp32
    block by block instead of rounding its input and output to bf16. With "layer" activations the upcast norms hand
    fp32 on inside each block (`blocks`), whose output is cast back to the model's dtype: the stream between blocks
    and the checkpointed block inputs stay half precision (each block computes as in "fp32" mode: its inputs are cast
    to fp32 inside its checkpoint); lm_head computes in fp32 as in "fp32" mode.
    """
    handles: list = []
    fp32_inside = activations in FP32_FLOWS and bool(upcast_norms)
    compute = {id(m) for m in compute_norms}
    # "layer": fp32 only inside the blocks; a norm outside every block (a cross-attention's, the final one) hands on
    # the model's dtype, which is what the masks and everything else between the blocks are in
    in_blocks = {id(m) for block in blocks for m in block.modules()} if activations == "layer" else None
    for norm, original_dtype in upcast_norms.items():
        in_fp32 = id(norm) in compute
        hands_fp32 = fp32_inside and (in_blocks is None or id(norm) in in_blocks)
        flow = UpcastNormFlow(torch.float32 if hands_fp32 else original_dtype, torch.float32 if in_fp32 else None)
        handles.append(norm.register_forward_pre_hook(flow.before))
        handles.append(norm.register_forward_hook(flow.after))
        if in_fp32:
            handles.append(ForwardOverride(norm, _fp32_compute_forward(norm)))
    if fp32_inside and activations == "fp32" and input_embeddings is not None:
        handles.append(input_embeddings.register_forward_hook(_embedding_output_to_fp32))
    if fp32_inside and activations == "layer":
        native = next(iter(upcast_norms.values()))
        for block in blocks:
            handles.append(ForwardOverride(block, _block_in_fp32(block)))
            handles.append(block.register_forward_hook(_block_output_to(native)))
    for module in consumers:
        if fp32_inside and computes_in_fp32(module):
            cast_input = activations == "layer"
            handles.append(ForwardOverride(module, _fp32_linear_forward(module, chunk_bytes, cast_input)))
            continue
        guard = InputDtypeGuard()
        handles.append(module.register_forward_pre_hook(guard.before, with_kwargs=True))
        handles.append(module.register_forward_hook(guard.after))
    if fp32_inside:
        for module in fallback_consumers:
            handles.append(ForwardOverride(module, _fallback_forward(module)))
    return handles
