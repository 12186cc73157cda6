"""What token blocks did, call by call: the calls run in blocks and those run whole, with the reason, per part."""

from __future__ import annotations

from collections import Counter
from typing import Any

#: the parts token blocks cover
HEAD_AND_LOSS = "head and loss"
MLPS = "MLPs"
NORMS = "norms"


class BlockedCalls:
    """Live counts since prepare(): for each part, how many calls ran in blocks and how many ran whole, by reason.

    A checkpointed layer's MLP is called once per step where non-reentrant checkpointing's recompute stops before it
    (the blocked MLP keeps what its backward needs), twice otherwise (the recompute is a call too).
    """

    def __init__(self) -> None:
        self.blocked: Counter[str] = Counter()
        self.whole: dict[str, Counter[str]] = {}

    def ran_blocked(self, part: str) -> None:
        self.blocked[part] += 1

    def ran_whole(self, part: str, reason: str) -> None:
        self.whole.setdefault(part, Counter())[reason] += 1

    def to_dict(self) -> dict[str, Any]:
        parts = sorted(set(self.blocked) | set(self.whole))
        return {
            part: {"blocked": self.blocked[part], "whole": dict(self.whole.get(part, Counter()))} for part in parts
        }

    def lines(self) -> list[str]:
        """One human line per part that was called."""
        out = []
        for part, counts in self.to_dict().items():
            whole = sum(counts["whole"].values())
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts["whole"].items()))
            line = f"{part}: {counts['blocked']} calls in blocks, {whole} whole"
            out.append(f"{line} ({reasons})" if reasons else line)
        return out

    def __repr__(self) -> str:
        return f"BlockedCalls({self.to_dict()!r})"
