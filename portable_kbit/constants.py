"""Constants every layer shares: byte units, the half-precision dtypes, and the marker for a missing entry."""

from __future__ import annotations

from typing import Any

import torch

MiB = 1 << 20
GiB = 1 << 30

#: the dtypes prepare() may upcast to fp32 (exact: every fp16 and bf16 value is an fp32 value)
HALF_DTYPES = (torch.float16, torch.bfloat16)

#: "there was nothing here" where None is a value someone may have set (an attribute, a dict entry)
MISSING: Any = object()
