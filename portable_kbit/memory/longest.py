"""The longest sequence length whose predicted peak fits a budget: a bracketed false-position search over
predictions, each of which may cost a fake step."""

from __future__ import annotations

import math
from collections.abc import Callable

#: the longest length is a multiple of this
SEQ_LEN_STEP = 256
#: predictions the search may make beyond those it is given
MAX_SEARCH_STEPS = 12


def longest_fitting(
    predict: Callable[[int], int], budget: int, ceiling: int, known: dict[int, int]
) -> tuple[int | None, str | None]:
    """The longest multiple of SEQ_LEN_STEP up to `ceiling` whose prediction fits `budget` (peaks grow with length).

    Known predictions bracket it first; then a false-position search (interpolating between the bracket's ends,
    Illinois-style, with bisection when it stalls) takes a few more predictions. Returns (length, note or None).
    """
    top = max(1, ceiling // SEQ_LEN_STEP)
    values: dict[int, int] = {}
    for seq_len, peak in known.items():
        if seq_len % SEQ_LEN_STEP == 0 and seq_len <= top * SEQ_LEN_STEP:
            values[seq_len // SEQ_LEN_STEP] = peak
    evaluations = 0

    def value(k: int) -> int:
        nonlocal evaluations
        if k not in values:
            evaluations += 1
            values[k] = predict(k * SEQ_LEN_STEP)
        return values[k]

    fitting = [k for k, v in values.items() if v <= budget]
    failing = [k for k, v in values.items() if v > budget]
    lo = max(fitting, default=0)
    hi = min((k for k in failing if k > lo), default=None)
    if hi is None:
        if value(top) <= budget:
            return top * SEQ_LEN_STEP, None
        hi = top
    if lo == 0 and value(1) > budget:
        return None, None
    lo = max(lo, 1)
    while hi - lo > 1:
        if evaluations >= MAX_SEARCH_STEPS:
            return lo * SEQ_LEN_STEP, (
                f"longest_seq_len: search stopped after {evaluations} predictions; the answer lies between "
                f"{lo * SEQ_LEN_STEP} (fits) and {hi * SEQ_LEN_STEP} (does not)"
            )
        below, above = budget - value(lo), value(hi) - budget  # below >= 0, above > 0
        k = min(hi - 1, max(lo + 1, math.floor(lo + (hi - lo) * below / (below + above))))
        if value(k) <= budget:  # the crossing is above k: is it right there?
            lo = k
            if hi - lo > 1 and value(k + 1) > budget:
                hi = k + 1
        else:
            hi = k
            if hi - lo > 1 and value(k - 1) <= budget:
                lo = k - 1
    return lo * SEQ_LEN_STEP, None
