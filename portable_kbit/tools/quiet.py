"""Keep third-party console noise out of the tools' own runs (the CLI, the demo, the tiny models), for their duration.

What it silences, and where each comes from (bitsandbytes 0.50, torchao 0.18, torch 2.13, transformers 5.25):

- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community ..." (logger
  ``bitsandbytes.backends.cpu.ops``, at bitsandbytes' import on CPUs with AVX512-BF16, when the ``kernels`` package
  will not fetch its optional kernel), and the ``kernels`` package's own "Skipping publisher trust check for
  'kernels-community/...' because Hugging Face Hub is in offline mode" (logger ``kernels``, with HF_HUB_OFFLINE=1);
- torchao's "Failed to load .../torchao/_C_*.so" (logger ``torchao`` at torchao's import, optional compiled extensions
  built for another Python or GPU);
- torch's "W... torch/utils/_pytree.py:...] <enum ...> is an Enum subclass ... register_constant() ... deprecated"
  (logger ``torch.utils._pytree``, when torchao registers its enums at import);
- transformers' "Writing model shards" and "Loading weights" progress bars (its own tqdm, behind
  ``transformers.utils.logging.disable_progress_bar``) and its ``[transformers] ...`` notices (its logger, behind
  ``set_verbosity_error``);
- library warnings through ``warnings.warn`` (FutureWarnings that peft and transformers raise about each other).

All of them go through Python's logging or warnings: nothing is written to the C-level stderr, so no file descriptor is
redirected. Everything is put back on exit; importing this module changes nothing. The package's own warnings (their
categories, or a message that names portable_kbit, or raised from its code) still show. Warning filters are not
touched, so ``-W error`` still turns a library's warning into an error.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

#: loggers whose warnings a user cannot act on: import-time notices about optional kernels and torch's deprecation
#: of a call torchao makes
LOGGERS = ("bitsandbytes", "kernels", "torchao", "torch.utils._pytree")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: True inside quiet(False): everything is kept, nested quiet() calls included (--verbose)
_KEEP: contextvars.ContextVar[bool] = contextvars.ContextVar("portable_kbit_keep_output", default=False)
#: True inside an active quiet(): a nested one has nothing to add
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("portable_kbit_quiet", default=False)


def keeping() -> bool:
    """Whether the current scope keeps third-party output (inside quiet(False), as with the CLI's --verbose)."""
    return _KEEP.get()


def is_own_warning(message: Warning | str, category: type[Warning], filename: str) -> bool:
    """A warning of portable_kbit's own: one of its categories, a message that names it, or raised from its code."""
    return (
        category.__module__.split(".")[0] == "portable_kbit"
        or str(message).startswith(("portable_kbit", "memory_guard"))
        or os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep)
    )


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """For the duration: no third-party progress bars, notices or warnings on the console (see the module docstring).

    quiet(False) keeps everything, and makes nested quiet() calls keep everything too: the CLI's --verbose wraps its
    run in it, so that the demo and the tiny models, which quiet themselves, show what the libraries print.
    """
    if not enabled:
        token = _KEEP.set(True)
        try:
            yield
        finally:
            _KEEP.reset(token)
        return
    if _KEEP.get() or _ACTIVE.get():
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [logger.level for logger in loggers]
    token = _ACTIVE.set(True)
    with warnings.catch_warnings():  # puts showwarning back on exit
        shown = warnings.showwarning

        def show_own(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: Any = None,
            line: str | None = None,
        ) -> None:
            if is_own_warning(message, category, filename):
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show_own
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


__all__ = ["LOGGERS", "is_own_warning", "keeping", "quiet"]
