"""Which parameters change: adapted modules -> the norms that feed them, modules_to_save, per upcast policy.

Nothing here changes the model. The only forward pass is a short trace (two tokens, no grad) that finds which norm's
output each adapted module consumes; it stops as soon as every kind of adapted module has been seen once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn

from ..model.hf import hf_model, input_embeddings, is_peft_model, set_training_flags, weight_of
from ..model.index import ModelIndex, as_index

POLICIES = ("adjacent", "norms", "none", "peft")
#: how a frozen norm the policy selects gets fp32: computed in fp32 at call time (its parameters keep their dtype), or
#: its parameters cast to fp32 (v0.1's behaviour; trained parameters, modules_to_save, are always cast)
FROZEN_NORMS = ("compute", "upcast")
HALF_DTYPES = (torch.float16, torch.bfloat16)
TORCH_NORM_TYPES: tuple[type, ...] = tuple(
    t for t in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t is not None
)
LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


@dataclasses.dataclass
class ParamCast:
    """One parameter to upcast: reversible, since fp16/bf16 -> fp32 -> back is exact."""

    name: str
    module: nn.Module
    attr: str
    old_dtype: torch.dtype
    new_dtype: torch.dtype
    numel: int
    device: torch.device

    @property
    def old_bytes(self) -> int:
        return self.numel * _itemsize(self.old_dtype)

    @property
    def new_bytes(self) -> int:
        return self.numel * _itemsize(self.new_dtype)


@dataclasses.dataclass
class AdapterSpec:
    """Where adapters are (PeftModel) or will be (target_modules / LoraConfig / peft's defaults)."""

    adapted: list[str]
    modules_to_save: list[str]
    source: str
    peft_config: Any = None


@dataclasses.dataclass
class Plan:
    policy: str
    casts: list[ParamCast]
    upcast_norms: dict[str, torch.dtype]  # norm module name -> its dtype before the upcast (the flow's native dtype)
    compute_norms: list[str]  # the upcast norms computed in fp32 at call time: their parameters are not cast
    adapter_spec: AdapterSpec | None
    quantized: dict[str, str]  # parameter name -> quantizer
    already_fp32: list[str]
    notes: list[str]
    trace_seconds: float = 0.0  # of the planning, the trace forward that found the adjacent norms


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def is_norm(module: nn.Module) -> bool:
    """torch's norm types, or a model's own norm class (LlamaRMSNorm, GemmaRMSNorm ...): only 1-D parameters."""
    if isinstance(module, TORCH_NORM_TYPES):
        return True
    if module._modules or "norm" not in type(module).__name__.lower():
        return False
    params = [p for p in module._parameters.values() if p is not None]
    return bool(params) and all(p.dim() == 1 for p in params)


def norm_names(model: nn.Module | ModelIndex) -> list[str]:
    return [name for name, module in as_index(model).modules.items() if name and is_norm(module)]


# ---- where adapters go ---------------------------------------------------------------------------------------


def _peft() -> Any:
    import peft

    return peft


def tuner_layers(model: nn.Module | ModelIndex) -> dict[str, nn.Module]:
    """Modules that carry an adapter, by peft's own base class."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers: dict[str, nn.Module] = {}
    for name, module in as_index(model).modules.items():
        if isinstance(module, BaseTunerLayer):  # peft's class is a mixin: mypy narrows to it, away from nn.Module
            layers[name] = cast(nn.Module, module)
    return layers


def adapter_submodules(model: nn.Module | ModelIndex) -> set[int]:
    """ids of the adapters' own modules (lora_A, lora_B ...): peft casts their inputs itself."""
    ids: set[int] = set()
    for layer in tuner_layers(model).values():
        for attr in getattr(layer, "adapter_layer_names", ()):
            container = getattr(layer, attr, None)
            if isinstance(container, nn.Module):
                ids.update(id(m) for m in container.modules())
    return ids


def modules_to_save_wrappers(model: nn.Module | ModelIndex) -> dict[str, nn.Module]:
    from peft.utils.other import ModulesToSaveWrapper

    return {name: m for name, m in as_index(model).modules.items() if isinstance(m, ModulesToSaveWrapper)}


def _lora_config(target_modules: Any, model: nn.Module):
    """A LoraConfig from a LoraConfig, names, a regex, or None (peft's defaults for the model type)."""
    peft = _peft()
    if isinstance(target_modules, peft.PeftConfig):
        config = target_modules
        if getattr(config, "target_modules", None) is None:
            raise ValueError(
                f"target_modules is a {type(config).__name__} that names no target modules: prepare() needs to know "
                "which layers get adapters. Pass a LoraConfig with target_modules, module names, or a regex."
            )
    else:
        names_ok = isinstance(target_modules, str) or (
            isinstance(target_modules, (list, tuple, set, frozenset))
            and all(isinstance(n, str) for n in target_modules)
        )
        if target_modules is not None and not names_ok:
            raise TypeError(
                f"target_modules must be module names (a list of str), a regex (str), a peft LoraConfig or None, "
                f"not {target_modules!r}"
            )
        config = peft.LoraConfig(target_modules=target_modules)
        if target_modules is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            defaults = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
            if defaults is None:
                return None
            config = peft.LoraConfig(target_modules=list(defaults))
    include_all_linear = getattr(peft.tuners.tuners_utils, "_maybe_include_all_linear_layers", None)
    if include_all_linear is not None and isinstance(config.target_modules, str):
        config = include_all_linear(config, model)
    return config


def _matches_modules_to_save(name: str, modules_to_save: Iterable[str]) -> bool:
    return any(name == key or name.endswith("." + key) for key in modules_to_save)


def adapter_spec(model: nn.Module, target_modules: Any, index: ModelIndex | None = None) -> AdapterSpec | None:
    """The adapted modules. None when nothing says where adapters go (no PeftModel, no targets, no peft default)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    index = index or ModelIndex(model)
    if is_peft_model(model):
        adapted = sorted(tuner_layers(index))
        to_save = sorted(modules_to_save_wrappers(index))
        if target_modules is not None:
            _check_consistent(model, adapted, target_modules)
        return AdapterSpec(adapted, to_save, "PeftModel")

    config = _lora_config(target_modules, model)
    if config is None:
        return None
    candidates = list(index.leaves())
    adapted = [n for n in candidates if check_target_module_exists(config, n)]
    if not adapted:
        message = _nothing_matched_message(config.target_modules, candidates)
        layers = getattr(config, "layers_to_transform", None)
        if layers is not None:  # the names may match, but not in the layers asked for
            message += f" Note layers_to_transform={layers!r}: it may select no layer that exists here."
        raise ValueError(message)
    to_save = [n for n in index.modules if n and _matches_modules_to_save(n, config.modules_to_save or ())]
    source = "peft defaults for model_type" if target_modules is None else "target_modules"
    return AdapterSpec(adapted, to_save, source, config)


def _nothing_matched_message(target_modules: Any, leaf_names: Sequence[str]) -> str:
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules or [])
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in leaf_names})
    close = sorted({c for w in wanted for c in difflib.get_close_matches(str(w).rsplit(".", 1)[-1], suffixes, n=3)})
    hint = f"closest module names: {', '.join(close)}" if close else f"module names here: {', '.join(suffixes[:20])}"
    return (
        f"target_modules={target_modules!r} matches no module of this model; {hint}. "
        "Pass names that get_peft_model would match (e.g. ['q_proj', 'v_proj']), or a LoraConfig."
    )


def _check_consistent(model: nn.Module, adapted: list[str], target_modules: Any) -> None:
    from peft.tuners.tuners_utils import check_target_module_exists

    base = hf_model(model)
    config = _lora_config(target_modules, base)
    prefix = "base_model.model."
    wanted = {prefix + n for n, _ in base.named_modules() if n and check_target_module_exists(config, n)}
    wanted = {n for n in wanted if n in set(adapted) or not any(True for _ in model.get_submodule(n).children())}
    if wanted != set(adapted):
        extra = sorted(wanted - set(adapted))[:5]
        missing = sorted(set(adapted) - wanted)[:5]
        raise ValueError(
            "target_modules disagrees with the adapters this PeftModel already has "
            f"(named but not adapted: {extra}; adapted but not named: {missing}). "
            "Leave target_modules=None for a PeftModel: its adapters say where they are."
        )


# ---- which norm feeds which adapted module ---------------------------------------------------------------------


class _TraceDone(Exception):
    """Raised inside the trace forward once every adapted-module pattern has been seen."""


def layer_pattern(name: str) -> str:
    return LAYER_INDEX.sub(".*", name)


def _fill_pattern(pattern: str, indices: list[str]) -> str | None:
    parts = pattern.split(".*")
    if len(parts) - 1 > len(indices):
        return None
    out = parts[0]
    for index, part in zip(indices[: len(parts) - 1], parts[1:], strict=True):
        out += "." + index + part
    return out


def _trace_input(model: nn.Module) -> dict[str, torch.Tensor]:
    embeddings = input_embeddings(model)
    if embeddings is None:
        raise ValueError("the model has no input embeddings: no token ids to trace with")
    weight = weight_of(embeddings)
    ids = torch.tensor([[1, 2]], dtype=torch.long, device=weight.device).clamp(max=weight.shape[0] - 1)
    return {"input_ids": ids}


def _shape_only_forward(module: nn.Module):
    """A stand-in forward that returns an empty meta tensor of the right shape, or None if we cannot tell the shape."""
    weight = getattr(module, "weight", None)
    float_dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point else None
    embedding_dim = getattr(module, "embedding_dim", None)
    if isinstance(embedding_dim, int):
        dtype = float_dtype or torch.float32
        return lambda ids, *args, **kwargs: torch.empty(*ids.shape, embedding_dim, device="meta", dtype=dtype)
    width = getattr(module, "out_features", None) or getattr(module, "nf", None)  # Linear-likes, Conv1D
    if isinstance(width, int):
        return lambda x, *args, **kwargs: torch.empty(*x.shape[:-1], width, device="meta", dtype=x.dtype)
    if is_norm(module):
        return lambda x, *args, **kwargs: torch.empty_like(x, device="meta")
    return None


def _stub_weighted_modules(modules: dict[str, nn.Module], stubbed: dict[nn.Module, Any]) -> None:
    """Replace the forward of every weight-holding layer (and peft's adapter wrappers) by a shape-only stand-in;
    `stubbed` records each module's instance forward before (None: none), for the caller to put back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in modules.values():
        is_leaf_with_weights = not module._modules and any(p is not None for p in module._parameters.values())
        if not (is_leaf_with_weights or isinstance(module, BaseTunerLayer)):
            continue
        stand_in = _shape_only_forward(module)
        if stand_in is None:
            # the stand-ins set so far come off before the fallback runs the real model (MoE experts hold 3-D
            # weights: no shape rule); the caller puts back any instance forward they covered
            for done in stubbed:
                done.__dict__.pop("forward", None)
            raise _CannotTraceOnMeta(f"no shape rule for {type(module).__name__}")
        stubbed[module] = module.__dict__.get("forward")
        module.__dict__["forward"] = stand_in


@contextlib.contextmanager
def shape_only_stand_ins(modules: dict[str, nn.Module]) -> Iterator[None]:
    """Shape-only stand-ins for the forwards of the weight-holding layers (for a trace on meta), for the block;
    what was in each instance forward (an earlier prepare()'s fp32 head) is put back after it."""
    stubbed: dict[nn.Module, Any] = {}
    try:
        _stub_weighted_modules(modules, stubbed)
        yield
    finally:
        for module, forward in stubbed.items():
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward


class _CannotTraceOnMeta(Exception):
    pass


def trace_feeding_norms(
    model: nn.Module, adapted: list[str], norms: list[str], index: ModelIndex | None = None
) -> dict[str, str | None]:
    """For each adapted module pattern (layer indices as *), the norm pattern whose output is its input, if any.

    First on the meta device, with every weight-holding layer replaced by a shape-only stand-in: no kernel runs and
    no memory is taken (a real first forward would initialise cuBLAS: +32 MiB and seconds on a fresh CUDA process).
    If the architecture's forward cannot run on meta tensors, a real two-token forward without grad does the trace.
    """
    index = index or ModelIndex(model)
    # First only the layers the trace can reach before it has seen every adapted pattern (usually the first layer);
    # a wrong guess fails on a real weight meeting a meta tensor, and the whole model is stubbed next.
    for inputs, reach in (("meta with a 4-D mask", "first"), ("meta with a 4-D mask", "all"), ("meta", "all")):
        try:
            return _trace(model, adapted, norms, inputs, index, reach)
        except (
            _CannotTraceOnMeta,
            RuntimeError,
            NotImplementedError,
            TypeError,
            ValueError,
            AttributeError,
            IndexError,
        ):
            continue
    return _trace(model, adapted, norms, "real", index, "all")


def _first_of_each_pattern(adapted: list[str]) -> list[str]:
    """The adapted module with the lowest layer indices of each pattern: the one the trace meets first."""
    first: dict[str, str] = {}
    for name in adapted:
        key = [int(i) for i in LAYER_INDEX.findall(name)]
        pattern = layer_pattern(name)
        if pattern not in first or key < [int(i) for i in LAYER_INDEX.findall(first[pattern])]:
            first[pattern] = name
    return list(first.values())


def _reachable(modules: dict[str, nn.Module], firsts: list[str]) -> dict[str, nn.Module]:
    """The modules a forward can run before it reaches each of `firsts`: those outside numbered layer stacks, and
    in each stack (the name up to its first index) the layers up to the highest index among `firsts` there."""
    bound: dict[str, int] = {}
    for name in firsts:
        match = LAYER_INDEX.search(name)
        if match is not None:
            stack = name[: match.start()]
            bound[stack] = max(bound.get(stack, -1), int(match.group(1)))
    reachable = {}
    for name, module in modules.items():
        match = LAYER_INDEX.search(name)
        if match is None or name[: match.start()] not in bound or int(match.group(1)) <= bound[name[: match.start()]]:
            reachable[name] = module
    return reachable


def _trace(
    model: nn.Module, adapted: list[str], norms: list[str], inputs_kind: str, index: ModelIndex, reach: str
) -> dict[str, str | None]:
    firsts = _first_of_each_pattern(adapted)
    modules = _reachable(index.modules, firsts) if reach == "first" else index.modules
    wanted = {layer_pattern(n) for n in adapted}
    feeding: dict[str, str | None] = {}
    norm_outputs: dict[int, str] = {}  # id of a norm's output tensor -> norm name
    keep_alive: list[torch.Tensor] = []  # so no id is reused within the trace
    handles = []

    def producer(tensor: torch.Tensor | None) -> str | None:
        while isinstance(tensor, torch.Tensor):
            if id(tensor) in norm_outputs:
                return norm_outputs[id(tensor)]
            tensor = tensor._base  # a view of a norm's output still comes from that norm
        return None

    def on_norm(name):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(tensor, torch.Tensor):
                norm_outputs[id(tensor)] = name
                keep_alive.append(tensor)

        return hook

    def on_adapted(name):
        def hook(module, args, kwargs):
            pattern = layer_pattern(name)
            if pattern in feeding:
                return
            tensor = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            norm = producer(tensor)
            feeding[pattern] = layer_pattern(norm) if norm is not None else None
            if wanted <= feeding.keys():
                raise _TraceDone

        return hook

    runner = hf_model(model)
    was_training = {m: m.training for m in index.modules.values()}
    tensors = _tensor_attributes(index.modules.values())
    try:
        for name in norms:
            if name in modules:
                handles.append(modules[name].register_forward_hook(on_norm(name)))
        for name in firsts:
            # prepend: see the input before hooks of an earlier prepare() (a dtype guard) replace it with a cast copy
            handles.append(modules[name].register_forward_pre_hook(on_adapted(name), with_kwargs=True, prepend=True))
        # Training mode on purpose: in eval mode bitsandbytes (CPU) repacks 4-bit weights for inference on the first
        # forward, a lasting change to a quantized weight. The flags only, restored below: train() recurses (a ms on
        # 7B models) and, from transformers 5.25, re-kernelizes (models.set_training_flags).
        set_training_flags(index.modules.values())
        with contextlib.ExitStack() as stand_ins:
            if inputs_kind == "real":
                inputs = _trace_input(runner)
            else:
                stand_ins.enter_context(shape_only_stand_ins(modules))
                inputs = {"input_ids": torch.zeros((1, 2), dtype=torch.long, device="meta")}
                if inputs_kind == "meta with a 4-D mask":
                    # Some mask builders inspect values (impossible on meta); a ready 4-D mask is passed through
                    # instead. Built on the CPU and moved: a first tril on meta runs a Python meta kernel (2 ms).
                    inputs["attention_mask"] = torch.ones((1, 1, 2, 2), dtype=torch.bool).tril().to("meta")
            with torch.no_grad():
                try:
                    runner(**inputs, use_cache=False)
                except _TraceDone:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        for module, training in was_training.items():
            module.training = training
        _restore_tensor_attributes(index.modules.values(), tensors)
    return feeding


def _tensor_attributes(modules: Iterable[nn.Module]) -> dict[nn.Module, dict[tuple[str, str], Any]]:
    """Every module's tensors that are neither parameters nor submodules: its buffers and plain tensor attributes.

    A forward may replace them: CTRL moves its position table with `self.pos_encoding = self.pos_encoding.to(...)`,
    rotary embeddings recompute `inv_freq` for a longer sequence. Done on meta inputs, that would leave a meta tensor
    in the model."""
    found: dict[nn.Module, dict[tuple[str, str], Any]] = {}
    for module in modules:
        own = {("_buffers", key): value for key, value in module._buffers.items()}
        own.update({("__dict__", k): v for k, v in module.__dict__.items() if isinstance(v, torch.Tensor)})
        found[module] = own
    return found


def _restore_tensor_attributes(
    modules: Iterable[nn.Module], before: dict[nn.Module, dict[tuple[str, str], Any]]
) -> None:
    """Put back what the trace replaced or removed, drop what it added."""
    for module in modules:
        own = before.get(module, {})
        for where, store in (("_buffers", module._buffers), ("__dict__", module.__dict__)):
            for key in [k for k, v in store.items() if where == "_buffers" or isinstance(v, torch.Tensor)]:
                old = own.get((where, key), _ABSENT)
                if old is _ABSENT:
                    del store[key]
                elif old is not store[key]:
                    store[key] = old
        for (where, key), old in own.items():
            store = module._buffers if where == "_buffers" else module.__dict__
            if key not in store:
                store[key] = old


_ABSENT = object()


def adjacent_norms(
    model: nn.Module, adapted: list[str], norms: list[str], index: ModelIndex | None = None
) -> tuple[list[str], list[str]]:
    """Concrete norm names that feed the adapted modules, and notes on what could not be placed."""
    feeding = trace_feeding_norms(model, adapted, norms, index)
    norm_set = set(norms)
    found: list[str] = []
    notes: list[str] = []
    unseen = sorted({layer_pattern(n) for n in adapted} - feeding.keys())
    if unseen:
        notes.append(f"not reached by the trace forward (no norm upcast for them): {unseen}")
    for name in adapted:
        norm_pattern = feeding.get(layer_pattern(name))
        if norm_pattern is None:
            continue
        norm = _fill_pattern(norm_pattern, LAYER_INDEX.findall(name))
        if norm in norm_set and norm not in found:
            found.append(norm)
    return found, notes


# ---- the plan --------------------------------------------------------------------------------------------------


def build(
    model: nn.Module, policy: str, target_modules: Any, frozen_norms: str = "compute", index: ModelIndex | None = None
) -> Plan:
    """Work out every change prepare() will make, without making any."""
    index = index or ModelIndex(model)
    quantized = index.quantized
    notes: list[str] = []
    unknown = sorted({kind for kind in quantized.values() if kind.startswith("unknown")})
    if unknown:
        notes.append(f"treated as quantized and left untouched (quantizer not recognised): {unknown}")

    # Other policies need adapters only for modules_to_save: peft's defaults add nothing there.
    needs_spec = policy == "adjacent" or target_modules is not None or is_peft_model(model)
    spec = adapter_spec(model, target_modules, index) if needs_spec else None
    norms = norm_names(index)
    upcast_norms: list[str] = []
    trace_seconds = 0.0
    if policy == "norms":
        upcast_norms = norms
    elif policy == "adjacent":
        if spec is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            notes.append(
                f"no adapter targets known for model_type {model_type!r}: every norm upcast. "
                "Pass target_modules (or a PeftModel) to upcast only the norms next to adapted layers."
            )
            upcast_norms = norms
        else:
            try:
                started = time.perf_counter()
                upcast_norms, trace_notes = adjacent_norms(model, spec.adapted, norms, index)
                trace_seconds = time.perf_counter() - started
                notes += trace_notes
            except Exception as error:  # a model whose forward we cannot trace: refuse to guess small
                notes.append(f"trace forward failed ({type(error).__name__}: {error}); every norm upcast instead")
                upcast_norms = norms

    names_to_cast: dict[str, None] = {}
    if policy == "peft":
        for name, p in index.parameters.items():
            if name not in quantized and p.dtype in HALF_DTYPES:
                names_to_cast[name] = None
    modules = index.modules
    trained_in_full = _modules_to_save_targets(index, spec)
    compute_norms: list[str] = []
    for norm in upcast_norms:
        if frozen_norms == "compute" and not any(norm == m or norm.startswith(m + ".") for m in trained_in_full):
            compute_norms.append(norm)
            continue
        for attr, value in modules[norm]._parameters.items():
            if value is not None:
                names_to_cast[f"{norm}.{attr}"] = None
    for module_name in trained_in_full:
        for name in index.parameter_names:
            if name.startswith(module_name + "."):
                names_to_cast[name] = None

    casts: list[ParamCast] = []
    already: list[str] = []
    seen: set[int] = set()
    params = index.parameter_names
    for name in names_to_cast:
        p = params[name]
        if id(p) in seen or name in quantized:
            continue
        seen.add(id(p))
        if p.dtype == torch.float32:
            already.append(name)
            continue
        if p.dtype not in HALF_DTYPES:
            continue
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name] if module_name else model
        casts.append(ParamCast(name, module, attr, p.dtype, torch.float32, p.numel(), p.device))

    cast_dtype_by_module = {id(c.module): c.old_dtype for c in casts}
    native = _model_dtype(index)
    norm_dtypes = {}
    for norm in upcast_norms:
        module = modules[norm]
        own = [p for p in module._parameters.values() if p is not None]
        norm_dtypes[norm] = cast_dtype_by_module.get(id(module)) or native or (own[0].dtype if own else torch.float32)
    return Plan(policy, casts, norm_dtypes, compute_norms, spec, quantized, already, notes, trace_seconds)


def _modules_to_save_targets(index: ModelIndex, spec: AdapterSpec | None) -> list[str]:
    """Modules trained in full: the trainable copies of a PeftModel, or what the LoraConfig names."""
    if spec is None:
        return []
    if spec.source == "PeftModel":
        names = []
        for wrapper_name, wrapper in modules_to_save_wrappers(index).items():
            for adapter in getattr(wrapper, "modules_to_save", {}):
                names.append(f"{wrapper_name}.modules_to_save.{adapter}")
        return names
    return spec.modules_to_save


def _model_dtype(index: ModelIndex) -> torch.dtype | None:
    """The dtype activations flow in natively: that of the first half-precision unquantized weight (None: none)."""
    for name, p in index.parameters.items():
        if p.dtype in HALF_DTYPES and name not in index.quantized:
            return p.dtype
    return None
