"""Where adapters go: a PeftModel's own adapters, or the modules that target_modules, a LoraConfig or peft's defaults
for the model type name; modules_to_save. Nothing here changes the model."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Sequence
from typing import Any, cast

from torch import nn

from ..model.hf import hf_model, is_peft_model
from ..model.index import ModelIndex, as_index


@dataclasses.dataclass
class AdapterSpec:
    """Where adapters are (PeftModel) or will be (target_modules / LoraConfig / peft's defaults)."""

    adapted: list[str]
    modules_to_save: list[str]
    source: str
    peft_config: Any = None


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
