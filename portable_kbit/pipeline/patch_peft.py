"""patch_peft(): code that already calls ``peft.prepare_model_for_kbit_training`` gets ``portable_kbit.prepare``.

Frameworks and copied recipes call peft's function themselves; they will not be rewritten. ``patch_peft()`` rebinds
that function (in ``peft``, ``peft.utils``, ``peft.utils.other``: every module attribute under peft bound to it) to a
wrapper that maps peft's arguments onto ``prepare()``, the way kernel libraries swap in their implementation
(Liger's ``apply_liger_kernel_to_llama()``). The returned handle undoes it exactly.

Two ways for code that cannot be edited, both applying the patch before that code runs: ``PORTABLE_KBIT_PATCH_PEFT=1``
in the environment (applied when ``portable_kbit`` is imported, e.g. from ``sitecustomize``) and
``python -m portable_kbit.run script.py`` (``portable_kbit/run.py``).

Importing this module imports no peft: it is part of ``import portable_kbit``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import backends
from .checks import check_options
from .prepare import prepare, report

ENV_SWITCH = "PORTABLE_KBIT_PATCH_PEFT"
SWITCH_ON = ("1", "true", "yes", "on")
SWITCH_OFF = ("0", "false", "no", "off", "")
PEFT_FUNCTION = "prepare_model_for_kbit_training"
_MARK = "__portable_kbit_patch__"  # set on the wrapper: its handle (never wrap a wrapper)

#: prepare()'s options that patch_peft() takes as defaults (everything but the model)
PREPARE_OPTIONS = tuple(name for name in inspect.signature(prepare).parameters if name != "model")
_PREPARE_DEFAULTS = {
    name: p.default for name, p in inspect.signature(prepare).parameters.items() if name in PREPARE_OPTIONS
}
#: peft's arguments that are prepare()'s arguments of the same name and meaning
_SAME_MEANING = ("use_gradient_checkpointing", "gradient_checkpointing_kwargs")


class PeftArgumentWarning(UserWarning):
    """A call of peft's function, patched, passed an argument that ``portable_kbit.prepare`` cannot honour."""


@dataclasses.dataclass
class _Level:
    """What one patch_peft() call changed: leaving its ``with`` block restores the state before it."""

    defaults_before: dict[str, Any] | None  # None: the patch was not active before this call
    rebound: list[tuple[types.ModuleType, str]]


class PeftPatch:
    """The active patch of ``peft.prepare_model_for_kbit_training``; returned by :func:`patch_peft`.

    ``original`` is peft's own function, ``wrapper`` what peft's names are bound to while the patch is active,
    ``defaults`` the prepare() options each call gets, ``rebound`` the (module, name) pairs this patch rebound.
    ``undo()`` puts the original back; as a context manager, leaving the block undoes that block's patch_peft() call.
    """

    def __init__(self, original: Callable[..., Any], defaults: dict[str, Any]) -> None:
        self.original = original
        self.defaults = defaults
        self.rebound: list[tuple[types.ModuleType, str]] = []
        self._levels: list[_Level] = []
        self._signature = inspect.signature(original)
        self.wrapper = self._make_wrapper()

    @property
    def active(self) -> bool:
        return _ACTIVE is self

    def undo(self) -> None:
        """Restore peft exactly: every name bound to the wrapper, in any loaded module, back to peft's function.

        Idempotent. A name someone else rebound after the patch is left as it is (with a warning). A reference to the
        wrapper kept elsewhere (a local variable, a class attribute) calls peft's own function from now on.
        """
        global _ACTIVE
        if not self.active:
            return
        _ACTIVE = None  # first: from here on the wrapper passes every call through to peft's function
        for module, name in self.rebound:
            current = module.__dict__.get(name)
            if current is not self.wrapper and current is not self.original:
                warnings.warn(
                    f"{module.__name__}.{name} was rebound to {current!r} after patch_peft(); left as it is",
                    RuntimeWarning,
                    stacklevel=2,
                )
        for module, name in _names_bound_to(self.wrapper, _loaded_modules()):
            setattr(module, name, self.original)
        self.rebound.clear()
        self._levels.clear()

    def __enter__(self) -> PeftPatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._leave_level()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<PeftPatch {state}: {len(self.rebound)} names rebound, defaults={self.defaults!r}>"

    # ---- inside ----

    def _leave_level(self) -> None:
        if not self.active:
            return
        level = self._levels.pop() if self._levels else None
        if level is None or level.defaults_before is None:
            self.undo()
            return
        self.defaults = level.defaults_before
        for module, name in level.rebound:
            if module.__dict__.get(name) is self.wrapper:
                setattr(module, name, self.original)
            self.rebound.remove((module, name))

    def _rebind(self, modules: Iterable[types.ModuleType]) -> list[tuple[types.ModuleType, str]]:
        bound = _names_bound_to(self.original, modules)
        for module, name in bound:
            setattr(module, name, self.wrapper)
        self.rebound += bound
        return bound

    def _make_wrapper(self) -> Callable[..., Any]:
        original, signature = self.original, self._signature
        model_parameter = next(iter(signature.parameters))

        @functools.wraps(original)  # keeps peft's signature visible: TRL inspects it for gradient_checkpointing_kwargs
        def prepare_model_for_kbit_training(*args: Any, **kwargs: Any) -> Any:
            if not self.active:
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)  # a call peft would refuse is refused the same way (TypeError)
            arguments = dict(bound.arguments)
            model = arguments.pop(model_parameter)
            mapped = map_peft_arguments(arguments, signature)
            options = {**self.defaults, **mapped}  # the call's own arguments win over the patch's defaults
            prepared = prepare(model, **options)
            done = report(model)
            if done is not None:
                done.notes.append(f"prepared by portable_kbit.patch_peft in place of peft's {PEFT_FUNCTION}")
            return prepared

        prepare_model_for_kbit_training.__doc__ = (
            f"portable_kbit.patch_peft() is active: this calls portable_kbit.prepare(model, ...) with peft's "
            f"arguments mapped (see portable_kbit/pipeline/patch_peft.py). peft's own function: {_MARK}.original.\n\n"
            + (original.__doc__ or "")
        )
        setattr(prepare_model_for_kbit_training, _MARK, self)
        return prepare_model_for_kbit_training


_ACTIVE: PeftPatch | None = None


def patch_peft(*, rebind_everywhere: bool = False, **defaults: Any) -> PeftPatch:
    """Make ``peft.prepare_model_for_kbit_training`` call ``portable_kbit.prepare``; returns the handle to undo it.

    Every module attribute under ``peft`` bound to peft's function (``peft``, ``peft.utils``, ``peft.utils.other``) is
    rebound to a wrapper with peft's signature. Each call maps peft's arguments: ``use_gradient_checkpointing`` and
    ``gradient_checkpointing_kwargs`` mean the same in prepare(); ``auto_clear_cache=True`` (peft's default) is what
    prepare() does anyway (it releases the cache once after its casts); an argument prepare() cannot honour
    (``auto_clear_cache=False``, a keyword from a newer peft) is ignored with a :class:`PeftArgumentWarning`.

    Args:
        rebind_everywhere: also rebind names bound to peft's function in every other module loaded now (code that did
            ``from peft import prepare_model_for_kbit_training`` before the patch keeps the original otherwise).
            Modules imported after the patch get the wrapper either way.
        **defaults: prepare()'s options for every call (``activations="native"``, ``target_modules=[...]``,
            ``device=...``, ``upcast=...``, ``chunk_bytes=...``; also ``use_gradient_checkpointing`` and
            ``gradient_checkpointing_kwargs``, which an argument of the call itself overrides). Checked now: an
            unknown name or a bad value raises before anything is patched.

    Calling it again while the patch is active does not stack: it returns the same handle, now with the new call's
    ``defaults`` (replacing the old ones) and, with ``rebind_everywhere``, the names loaded since rebound too.
    ``handle.undo()`` restores peft exactly, whatever number of calls made the patch. As a context manager, leaving a
    ``with patch_peft(...)`` block undoes that block's call: the defaults before it come back, or, if the patch was
    not active before it, peft's function.
    """
    global _ACTIVE
    checked = check_defaults(defaults)
    import peft

    if _ACTIVE is not None:
        handle = _ACTIVE
        level = _Level(handle.defaults, [])
        handle.defaults = checked
    else:
        handle = PeftPatch(_peft_function(peft), checked)
        level = _Level(None, [])
        _ACTIVE = handle
    level.rebound += handle._rebind(_loaded_modules(peft_only=True))
    if rebind_everywhere:
        level.rebound += handle._rebind(_loaded_modules())
    handle._levels.append(level)
    return handle


def active_patch() -> PeftPatch | None:
    """The active patch, or None."""
    return _ACTIVE


def check_defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """prepare()'s options, checked as prepare() checks them, before any model exists; returns a copy."""
    if "model" in defaults:
        raise TypeError("patch_peft() takes prepare()'s options; the model is what each call of peft's function gives")
    for name in defaults:
        if name not in PREPARE_OPTIONS:
            close = difflib.get_close_matches(name, PREPARE_OPTIONS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(
                f"patch_peft() got {name!r}, which is not an option of portable_kbit.prepare: {hint}"
                f"its options are {', '.join(PREPARE_OPTIONS)}"
            )
    merged = {**_PREPARE_DEFAULTS, **defaults}
    if isinstance(merged["device"], bool):
        raise TypeError("patch_peft(device=...) takes a device name; for checkpointing: use_gradient_checkpointing=")
    if "device" in defaults:
        backends.resolve(merged["device"])  # an unknown or unavailable device fails here, not at the first call
    if not isinstance(merged["use_gradient_checkpointing"], bool):
        raise TypeError(
            f"use_gradient_checkpointing must be True or False, not {merged['use_gradient_checkpointing']!r}"
        )
    checked = inspect.signature(check_options).parameters
    check_options(**{name: value for name, value in merged.items() if name in checked})
    return dict(defaults)


def map_peft_arguments(arguments: Mapping[str, Any], signature: inspect.Signature) -> dict[str, Any]:
    """prepare()'s keyword arguments for the arguments a call of peft's function passed (the model left out).

    Only arguments the call passed: what it left out falls to the patch's defaults, then to prepare()'s own, which
    are peft's. An argument that means nothing here is dropped with a PeftArgumentWarning, never silently.
    """
    mapped: dict[str, Any] = {}
    for name, value in _flatten(arguments, signature):
        if name in _SAME_MEANING:
            mapped[name] = value
        elif name == "auto_clear_cache":
            if not value:
                _warn_ignored(
                    name,
                    value,
                    "portable_kbit.prepare releases the allocator cache once after its casts (it casts only a few "
                    "small tensors, so that release is cheap) and has no switch for it",
                )
        else:
            _warn_ignored(name, value, "portable_kbit.prepare has no counterpart for it")
    return mapped


def parse_switch(value: str) -> bool:
    """The environment switch's value: on (1/true/yes/on), off (0/false/no/off/empty), else a ValueError."""
    normalized = value.strip().lower()
    if normalized in SWITCH_ON:
        return True
    if normalized in SWITCH_OFF:
        return False
    raise ValueError(
        f"{ENV_SWITCH}={value!r} is not understood: set it to 1 (patch peft's prepare_model_for_kbit_training at "
        f"import of portable_kbit) or 0 / unset it; accepted: {', '.join(SWITCH_ON)} / {', '.join(SWITCH_OFF[:-1])}"
    )


def apply_environment_switch(environ: Mapping[str, str] = os.environ) -> PeftPatch | None:
    """``PORTABLE_KBIT_PATCH_PEFT=1``: patch peft now (called by ``import portable_kbit``); None when it is off."""
    value = environ.get(ENV_SWITCH)
    if value is None or not parse_switch(value):
        return None
    return patch_peft()


# ---- helpers ---------------------------------------------------------------------------------------------------


def _peft_function(peft: types.ModuleType) -> Callable[..., Any]:
    function = getattr(peft, PEFT_FUNCTION)
    previous = getattr(function, _MARK, None)  # a wrapper left by an earlier copy of this module (reload): unwrap
    return previous.original if isinstance(previous, PeftPatch) else function


def _loaded_modules(peft_only: bool = False) -> list[types.ModuleType]:
    modules = []
    for name, module in list(sys.modules.items()):
        if not isinstance(module, types.ModuleType):
            continue
        if peft_only and not (name == "peft" or name.startswith("peft.")):
            continue
        modules.append(module)
    return modules


def _names_bound_to(target: object, modules: Iterable[types.ModuleType]) -> list[tuple[types.ModuleType, str]]:
    """Module-level names bound to `target` (by identity)."""
    found = []
    for module in modules:
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        found += [(module, name) for name, value in list(namespace.items()) if value is target]
    return found


def _flatten(arguments: Mapping[str, Any], signature: inspect.Signature) -> list[tuple[str, Any]]:
    """(name, value) pairs; a **kwargs of peft's function gives its own names, a *args its positions."""
    out: list[tuple[str, Any]] = []
    for name, value in arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out += list(value.items())
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out += [(f"{name}[{index}]", item) for index, item in enumerate(value)]
        else:
            out.append((name, value))
    return out


def _warn_ignored(name: str, value: Any, why: str) -> None:
    warnings.warn(
        f"peft's {PEFT_FUNCTION}({name}={value!r}) is patched to portable_kbit.prepare: {why}, so it is ignored. "
        "Call portable_kbit.prepare yourself for its own options, or undo the patch to get peft's behaviour.",
        PeftArgumentWarning,
        stacklevel=4,
    )
