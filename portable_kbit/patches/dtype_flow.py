"""The dtype flow: the patches that keep dtypes consistent once some norms compute in fp32.

Two rules, both explicit rather than left to dtype promotion inside each architecture's norm:
- an upcast norm computes in its (fp32) weight dtype and hands on fp32 ("fp32" activations, peft's numerics) or its
  original dtype ("native", the lowest activation memory);
- a consumer whose kernel wants its input in its weight dtype (nn.Linear such as lm_head, Conv1D, LayerNorm, an
  optimum-quanto layer, adapted or not; and any module that computes with matrices of its own outside those types:
  MoE routers and grouped experts kept as nn.Parameters, custom projections) computes in that dtype and returns the
  dtype it was given, as bitsandbytes layers already do, so the flow stays the same on every quantizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D  # GPT-2 style transposed linear

from ..constants import HALF_DTYPES
from ..model.quantized import handles_its_own_input_dtype, quantization_kind
from .arguments import first_tensor, replace_first
from .fp32_compute import computes_in_fp32, fp32_compute_forward, fp32_linear_forward
from .layer_mode import layer_in_fp32, layer_output_to
from .protocol import Forward, Hook, InstanceForward, Patch

#: activations modes in which adapted layers compute in fp32 (the upcast norms hand fp32 on)
FP32_FLOWS = ("fp32", "mixed", "layer")
#: modes whose hidden stream is fp32 from the embedding on (in "layer" mode, only inside the layers)
FP32_STREAMS = ("fp32", "mixed")

STRICT_TYPES: tuple[type, ...] = (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Conv1d, nn.Conv2d, Conv1D)


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
                    x = first_tensor(args)
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
            return call_in(_common_dtype(_own_matrices(module)), call_previous, args, kwargs)

        return forward

    return make


def call_in(dtype: torch.dtype | None, call_previous: Forward, args: tuple, kwargs: dict[str, Any]) -> Any:
    """`call_previous` with its first floating-point positional input in `dtype` and its first floating-point output
    cast back to that input's dtype (called as it is where `dtype` is None or the input already has it)."""
    x = first_tensor(args)
    if dtype is None or x is None or not x.is_floating_point() or x.dtype == dtype:
        return call_previous(*args, **kwargs)
    output = call_previous(*replace_first(args, x.to(dtype)), **kwargs)
    y = first_tensor(output)
    return replace_first(output, y.to(x.dtype)) if y is not None and y.is_floating_point() else output


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
    """One upcast norm's casts: input to the dtype it computes in, output to the flow dtype; inside its forward
    (``around``), so that a norm run in token blocks casts one block at a time (its input's fp32 copy at full length
    was a large part of a long step's peak).

    The compute dtype is fp32 for a norm computed in fp32 at call time, else (None) its weight's dtype at call time
    (fp32 once its parameters were cast).
    """

    def __init__(self, flow_dtype: torch.dtype, compute_dtype: torch.dtype | None = None) -> None:
        self.flow_dtype = flow_dtype
        self.compute_dtype = compute_dtype

    def before(self, module: nn.Module, args: tuple) -> tuple | None:
        x = first_tensor(args)
        dtype = self.compute_dtype or _weight_dtype(module)
        if x is None or dtype is None or not x.is_floating_point() or x.dtype == dtype:
            return None
        return replace_first(args, x.to(dtype))

    def after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        y = first_tensor(output)
        if y is None or not y.is_floating_point() or y.dtype == self.flow_dtype:
            return None
        return replace_first(output, y.to(self.flow_dtype))

    def around(self, module: nn.Module) -> Callable[[Forward], Forward]:
        """The norm's forward with both casts (``before`` on its positional arguments, ``after`` on its output)."""

        def make(inner: Forward) -> Forward:
            def forward(*args: Any, **kwargs: Any) -> Any:
                cast = self.before(module, args)
                output = inner(*(args if cast is None else cast), **kwargs)
                out = self.after(module, args, output)
                return output if out is None else out

            return forward

        return make


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
        x = first_tensor(args)
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
        return replace_first(args, x.to(dtype)), kwargs

    def after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        caller_dtype = self.pending.pop() if self.pending else None
        y = first_tensor(output)
        if caller_dtype is None or y is None or not y.is_floating_point():
            return None
        return replace_first(output, y.to(caller_dtype))


def is_strict_consumer(module: nn.Module) -> bool:
    """A layer whose kernel fails (or silently misbehaves) on an input dtype other than its weight's: torch's layers
    with a weight (nn.Linear, Conv1D, LayerNorm ...), a quantized layer that dequantizes to a compute dtype, or a
    module that computes with matrices of its own (see _matrix_dtype). Embeddings take indices: never."""
    if handles_its_own_input_dtype(module) or isinstance(module, nn.Embedding):
        return False
    return _consumer_dtype(module) is not None


def _embedding_output_to_fp32(module: nn.Module, args: tuple, output: Any) -> Any:
    return output.float() if isinstance(output, torch.Tensor) and output.dtype in HALF_DTYPES else None


def computes_in(dtype: torch.dtype) -> Callable[[Forward], Forward]:
    """An instance forward ("mixed": a frozen MLP): the first floating-point input cast to `dtype`, the module run as
    without preparation, its first output cast back to the input's dtype (fp32: added to the fp32 stream)."""

    def make(call_previous: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return call_in(dtype, call_previous, args, kwargs)

        return forward

    return make


ForwardMaker = Callable[[Forward], Forward]


def _composed(outer: ForwardMaker, inner: ForwardMaker) -> ForwardMaker:
    """Two forward makers as one: `outer` around `inner` around the forward they replace."""
    return lambda previous: outer(inner(previous))


def fp32_heads(
    upcast_norms: dict[nn.Module, torch.dtype], consumers: Sequence[nn.Module], activations: str
) -> list[nn.Module]:
    """The consumers that compute in fp32 from their frozen half-precision weight (lm_head, in the fp32 flows)."""
    if activations not in FP32_FLOWS or not upcast_norms:
        return []
    return [module for module in consumers if computes_in_fp32(module)]


def install(
    upcast_norms: dict[nn.Module, torch.dtype],
    consumers: list[nn.Module],
    activations: str,
    input_embeddings: nn.Module | None = None,
    chunk_bytes: int = 64 << 20,
    compute_norms: Sequence[nn.Module] = (),
    layers: Sequence[nn.Module] = (),
    fallback_consumers: Sequence[nn.Module] = (),
    half_modules: Sequence[nn.Module] = (),
    bf16_parts_matmuls: bool = False,
) -> list[Patch]:
    """The dtype flow's patches, in the order to apply them (removed newest first, they restore the originals).

    Norms in `compute_norms` compute in fp32 at call time from their half-precision parameters. With "fp32"
    activations the embedding output is fp32 too (as with peft, whose embedding weight is fp32: the residual stream
    and the rotary cos/sin follow its dtype), and a frozen half-precision nn.Linear consumer (lm_head) computes in fp32
    block by block instead of rounding its input and output to bf16 (`bf16_parts_matmuls`: from bf16 matmuls that
    write fp32, see fp32_compute.py). With "layer" activations the upcast norms hand
    fp32 on inside each checkpointed layer (`layers`), whose output is cast back to the model's dtype: the stream
    between layers and the checkpointed layer inputs stay half precision (each layer computes as in "fp32" mode: its
    inputs are cast to fp32 inside its checkpoint); lm_head computes in fp32 as in "fp32" mode. With "mixed"
    activations the flow is that of "fp32", except that the modules in `half_modules` (the frozen MLPs) compute in the
    model's dtype, as without preparation, and hand fp32 back to the stream (attention's half-precision kernels are
    patches/attention.py's).
    """
    patches: list[Patch] = []
    fp32_inside = activations in FP32_FLOWS and bool(upcast_norms)
    compute = {id(m) for m in compute_norms}
    # "layer": fp32 only inside the layers; a norm outside every layer (a cross-attention's, the final one) hands on
    # the model's dtype, which is what the masks and everything else between the layers are in
    in_layers = {id(m) for layer in layers for m in layer.modules()} if activations == "layer" else None
    for norm, original_dtype in upcast_norms.items():
        in_fp32 = id(norm) in compute
        hands_fp32 = fp32_inside and (in_layers is None or id(norm) in in_layers)
        flow = UpcastNormFlow(torch.float32 if hands_fp32 else original_dtype, torch.float32 if in_fp32 else None)
        around = flow.around(norm)
        if in_fp32:  # one instance forward: the casts around the fp32 computation from the half-precision weights
            patches.append(InstanceForward(norm, _composed(around, fp32_compute_forward(norm))))
        else:
            patches.append(InstanceForward(norm, around))
    if fp32_inside and activations in FP32_STREAMS and input_embeddings is not None:
        patches.append(Hook(input_embeddings, _embedding_output_to_fp32, pre=False))
    if fp32_inside and activations == "layer":
        native = next(iter(upcast_norms.values()))
        for layer in layers:
            patches += [InstanceForward(layer, layer_in_fp32(layer)), Hook(layer, layer_output_to(native), pre=False)]
    heads = {id(m) for m in fp32_heads(upcast_norms, consumers, activations)}
    for module in consumers:
        if id(module) in heads:
            cast_input = activations == "layer"
            patches.append(
                InstanceForward(module, fp32_linear_forward(module, chunk_bytes, cast_input, bf16_parts_matmuls))
            )
            continue
        guard = InputDtypeGuard()
        patches.append(Hook(module, guard.before, pre=True, with_kwargs=True))
        patches.append(Hook(module, guard.after, pre=False))
    if fp32_inside and activations == "mixed" and half_modules:
        native = next(iter(upcast_norms.values()))
        patches += [InstanceForward(module, computes_in(native)) for module in half_modules]
    if fp32_inside:
        for module in fallback_consumers:
            patches.append(InstanceForward(module, _fallback_forward(module)))
    return patches
