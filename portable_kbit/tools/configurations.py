"""Training configurations for `portable-kbit fit`: an activations mode, token blocks or not, offloaded checkpoints or
not; named as "native+blocks+offload"; which of them to try on a device, and which to recommend."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

#: the two option values of --token-blocks and --offload that try both ways
BOTH = "both"
#: --offload "auto": both where the device has memory of its own, off where moving to the host frees nothing
AUTO = "auto"
CHOICES = ("off", "on", BOTH)
OFFLOAD_CHOICES = (*CHOICES, AUTO)

#: the activations modes from fastest to slowest step (H100, Mistral-7B shape, 4096 tokens; docs/benchmarks.md);
#: "layer" and "fp32" took the same time there, and "layer" keeps less memory
SPEED_ORDER = ("native", "mixed", "layer", "fp32")
#: what a recommendation of a mode other than the default changes in training (docs/api.md)
NUMERICS_CHANGES = {
    "native": "activations='native' learns more slowly in the first steps than peft's fp32 flow",
    "mixed": "activations='mixed' computes attention and frozen MLPs in bf16: a numerics change",
    "layer": "activations='layer' rounds the hidden states to bf16 between layers: a numerics change",
}


@dataclasses.dataclass(frozen=True)
class Configuration:
    activations: str
    token_blocks: bool = False
    offload: bool = False

    @property
    def name(self) -> str:
        return self.activations + ("+blocks" if self.token_blocks else "") + ("+offload" if self.offload else "")

    def prepare_options(self) -> dict[str, Any]:
        """prepare()'s keyword arguments for this configuration."""
        return {
            "activations": self.activations,
            "token_blocks": "auto" if self.token_blocks else None,
            "offload_checkpoints": self.offload,
        }

    def speed_rank(self) -> tuple[int, bool, bool]:
        """Smaller is faster: the mode's place in SPEED_ORDER, then without blocks, then without offload."""
        mode = SPEED_ORDER.index(self.activations) if self.activations in SPEED_ORDER else len(SPEED_ORDER)
        return mode, self.token_blocks, self.offload


def parse(name: str) -> Configuration:
    """'native+blocks+offload' -> Configuration; a plain mode name -> that mode alone."""
    from ..pipeline.checks import ACTIVATIONS

    mode, *extras = [part.strip() for part in str(name).split("+")]
    unknown = [extra for extra in extras if extra not in ("blocks", "offload")]
    if mode not in ACTIVATIONS or unknown or len(set(extras)) != len(extras):
        raise ValueError(
            f"configuration {name!r} is not known: an activations mode ({', '.join(ACTIVATIONS)}), optionally "
            "followed by +blocks and/or +offload, e.g. native+blocks+offload"
        )
    return Configuration(mode, "blocks" in extras, "offload" in extras)


def expand(
    names: Sequence[str], token_blocks: str = "off", offload: str = "off", why_no_offload: str | None = None
) -> tuple[list[Configuration], list[str]]:
    """Each named configuration, combined with --token-blocks and --offload ("off", "on", "both"; offload also
    "auto": "both" unless `why_no_offload` says it cannot help here). Returns the configurations and notes on what
    was left out and why. "on" for offload where it cannot help is refused: prepare() would refuse it too."""
    if token_blocks not in CHOICES:
        raise ValueError(f"--token-blocks {token_blocks!r}: use one of {', '.join(CHOICES)}")
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"--offload {offload!r}: use one of {', '.join(OFFLOAD_CHOICES)}")
    notes = []
    if offload == "on" and why_no_offload:
        raise ValueError(f"--offload on: {why_no_offload}. Use --offload off (or auto)")
    if offload == AUTO:
        offload = "off" if why_no_offload else BOTH
        if why_no_offload:
            notes.append(f"offloaded checkpoints not tried: {why_no_offload}")
    blocks_ways = {"off": [False], "on": [True], BOTH: [False, True]}[token_blocks]
    offload_ways = {"off": [False], "on": [True], BOTH: [False, True]}[offload]
    out: list[Configuration] = []
    for name in names:
        base = parse(name)
        if base.token_blocks or base.offload:  # named in full: as named
            candidates = [base]
        else:
            candidates = [Configuration(base.activations, b, o) for b in blocks_ways for o in offload_ways]
        for candidate in candidates:
            if candidate.offload and why_no_offload:
                raise ValueError(f"configuration {candidate.name!r}: {why_no_offload}")
            if candidate not in out:
                out.append(candidate)
    return out, notes


def recommend(records: Sequence[dict[str, Any]], seq_len: int | None = None) -> dict[str, Any] | None:
    """From fit's forecast records: with `seq_len`, the fastest configuration (SPEED_ORDER, then without blocks, then
    without offload) whose forecast fits that length; without, the one whose longest fitting length is the longest
    (the faster on a tie). None where no configuration fits anything asked."""
    forecasts = [r for r in records if r.get("kind") == "forecast"]
    rank = {r["mode"]: parse(r["mode"]).speed_rank() for r in forecasts}
    if seq_len is not None:
        fitting = [r for r in forecasts if (r.get("longest_seq_len") or 0) >= seq_len]
        if not fitting:
            return None
        best = min(fitting, key=lambda r: rank[r["mode"]])
        reason = f"the fastest configuration forecast to fit {seq_len} tokens in the budget"
    else:
        fitting = [r for r in forecasts if r.get("longest_seq_len")]
        if not fitting:
            return None
        best = min(fitting, key=lambda r: (-r["longest_seq_len"], rank[r["mode"]]))
        reason = "the configuration forecast to train the longest sequence in the budget"
    return {
        "kind": "recommendation",
        "configuration": best["mode"],
        "longest_seq_len": best["longest_seq_len"],
        "seq_len": seq_len,
        "reason": reason,
        "prepare": parse(best["mode"]).prepare_options(),
    }


def line(recommendation: dict[str, Any] | None, seq_len: int | None = None) -> str:
    """The recommendation as one sentence for the table's reader."""
    if recommendation is None:
        asked = f"{seq_len} tokens" if seq_len else "any length tried"
        return f"recommendation: none of the configurations is forecast to fit {asked} in the budget"
    options = ", ".join(f"{k}={v!r}" for k, v in recommendation["prepare"].items())
    text = (
        f"recommendation: {recommendation['configuration']}, {recommendation['reason']} (longest "
        f"{recommendation['longest_seq_len']} tokens): prepare(model, {options})"
    )
    if recommendation["prepare"]["activations"] in NUMERICS_CHANGES:
        text += f". Note: {NUMERICS_CHANGES[recommendation['prepare']['activations']]}"
    return text


def summary(records: Sequence[dict[str, Any]]) -> str:
    """One table over the configurations: the predicted peak (MiB) at each length asked, and the longest length that
    fits."""
    forecasts = [r for r in records if r.get("kind") == "forecast"]
    lengths = sorted({int(k) for r in forecasts for k in r["peak_bytes"]})
    head = ["configuration", *(f"peak at {n} (MiB)" for n in lengths), "longest that fits"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for record in forecasts:
        peaks = [record["peak_bytes"].get(str(n), record["peak_bytes"].get(n)) for n in lengths]
        cells = ["" if p is None else f"{p / (1 << 20):.1f}" for p in peaks]
        lines.append("| " + " | ".join([record["mode"], *cells, str(record.get("longest_seq_len") or "none")]) + " |")
    return "\n".join(lines)
