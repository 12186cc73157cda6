"""The output head and the causal-LM loss in blocks of tokens: the model's ``loss_function`` computes transformers'
loss from the head's input, one checkpointed block at a time, so that the ``[tokens, vocab]`` logits never exist.

The contract, as torchtune's ``LinearCrossEntropyLoss`` states its own: in training mode with labels, the head runs
on zero tokens (a ``[batch, 0, vocab]`` stand-in), the loss is transformers' ``ForCausalLMLoss`` (shift, ignore_index,
``num_items_in_batch``) computed through the head module itself and the recorded logit transform, and
``outputs.logits`` is None. Every other call (eval mode, no labels, one block or fewer tokens) runs as it would
without token blocks; each call is counted either way, with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...model.hf import output_embeddings
from ...model.logit_transform import LogitTransform
from ...model.trace import is_tracing
from ..protocol import Hook, InstanceAttribute, Patch
from .counts import HEAD_AND_LOSS, BlockedCalls
from .mlp import checkpointed

IGNORE_INDEX = -100
# labelled rows below this fraction of all rows: the loss scores only the labelled ones (padding, prompt tokens)
COMPACT_BELOW = 7 / 8


@dataclasses.dataclass
class _Call:
    """One forward of the model: what its head was given, and whether the call was counted yet."""

    handle: Any = None
    head: nn.Module | None = None
    hidden: torch.Tensor | None = None
    used: bool = False
    counted: bool = False


class HeadAndLoss:
    """The forward pre-hook, the one-shot head hook, the loss function and the output fix-up of one model."""

    def __init__(
        self, model: nn.Module, size: int, transform: LogitTransform, original_loss: Callable, counts: BlockedCalls
    ) -> None:
        self.model = model
        self.size = size
        self.transform = transform
        self.original_loss = original_loss
        self.counts = counts
        self.calls: list[_Call] = []
        self._signature: inspect.Signature | None = None

    def patches(self) -> list[Patch]:
        loss = self.loss
        loss_function = functools.wraps(self.original_loss)(lambda *args, **kwargs: loss(*args, **kwargs))
        loss_function.blocked_loss_of = self.original_loss  # type: ignore[attr-defined]
        return [
            Hook(self.model, self.before, pre=True, with_kwargs=True),
            Hook(self.model, self.after, pre=False, with_kwargs=True, always_call=True),
            InstanceAttribute(self.model, "_loss_function", loss_function),
        ]

    def _whole(self, call: _Call, reason: str) -> None:
        if not call.counted:
            call.counted = True
            self.counts.ran_whole(HEAD_AND_LOSS, reason)

    def _labels(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if "labels" in kwargs:
            return kwargs["labels"]
        if len(args) < 2:
            return None
        try:
            if self._signature is None:
                self._signature = inspect.signature(module.forward)
            return self._signature.bind_partial(*args).arguments.get("labels")
        except (TypeError, ValueError):
            return None

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = _Call()
        self.calls.append(call)
        if is_tracing():
            call.counted = True  # the trace of a later prepare(): not a call of the user's
            return
        if not module.training:
            return self._whole(call, "eval mode")
        if self._labels(module, args, kwargs) is None:
            return self._whole(call, "no labels")
        head = output_embeddings(module)  # now: a peft wrapper added after prepare() is the one called
        if head is None:
            return self._whole(call, "no output head")
        call.head = head
        call.handle = head.register_forward_pre_hook(functools.partial(self._keep_hidden, call), prepend=True)
        return None

    def _keep_hidden(self, call: _Call, head: nn.Module, args: tuple) -> tuple | None:
        call.handle.remove()
        call.handle = None
        hidden = args[0] if args else None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
            self._whole(call, "the head's input is not a tensor of tokens")
            return None
        if hidden.numel() // max(1, hidden.shape[-1]) <= self.size:
            self._whole(call, "one block or fewer tokens")  # the head runs as usual, the loss is transformers' own
            return None
        call.hidden = hidden
        return (hidden[..., :0, :], *args[1:])  # the head runs on no tokens: a [batch, 0, vocab] stand-in

    def loss(
        self,
        logits: Any,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: Any = None,
        ignore_index: int = IGNORE_INDEX,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        call = self.calls[-1] if self.calls else None
        stand_in = isinstance(logits, torch.Tensor) and logits.dim() >= 2 and logits.shape[-2] == 0
        if call is None or call.hidden is None or call.used or not stand_in:
            if call is not None and call.hidden is not None:
                self._whole(call, "the loss was not given the head's output")
            return self.original_loss(
                logits,
                labels,
                vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kwargs,
            )
        call.used = call.counted = True
        self.counts.ran_blocked(HEAD_AND_LOSS)
        assert call.head is not None
        return blocked_causal_lm_loss(
            call.hidden,
            call.head,
            self.transform,
            labels,
            vocab_size,
            self.size,
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
            shift_labels=shift_labels,
        )

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = self.calls.pop() if self.calls else None
        if call is None:
            return None
        if call.handle is not None:  # the head was never called (a forward that computes its own head)
            call.handle.remove()
            self._whole(call, "the forward did not call the output head")
        if not call.used:
            self._whole(call, "the model did not call its loss_function")
            return None
        logits = output.get("logits") if isinstance(output, dict) else None
        if logits is None:
            return None
        # as Liger's skip_logits: the logits were never built at full length
        fields = {key: value for key, value in output.items() if key != "logits"}
        try:
            return type(output)(**fields)
        except TypeError:  # an output class that cannot be rebuilt from its items: its logits item set to None
            output["logits"] = None
            return output


def blocked_causal_lm_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    vocab_size: int,
    size: int,
    num_items_in_batch: Any = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ForCausalLMLoss, computed from the head's input in blocks of `size` tokens: shift (unless
    `shift_labels`), ignore_index, sum over the labelled tokens divided by their count or by `num_items_in_batch`.
    Each block's logits exist only inside its checkpoint: recomputed in backward, never kept."""
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    rows = hidden.reshape(-1, hidden.shape[-1])
    if rows.shape[0] != targets.shape[0]:
        raise ValueError(
            f"the labels have {targets.shape[0]} positions for {rows.shape[0]} hidden states (token blocks)"
        )
    labelled = targets != ignore_index
    count = int(labelled.sum())  # one synchronisation per step
    if count < rows.shape[0] * COMPACT_BELOW:  # padding, prompt tokens: score only the labelled rows
        index = labelled.nonzero().squeeze(1)
        rows, targets = rows.index_select(0, index), targets.index_select(0, index)
    block = functools.partial(_block_loss, head, transform, vocab_size, ignore_index)
    total: torch.Tensor | None = None
    for start in range(0, rows.shape[0], size):
        part = checkpointed(block, rows[start : start + size], targets[start : start + size])
        total = part if total is None else total + part
    if total is None:  # no labelled token at all: 0 / 0 as cross_entropy's mean gives, still attached to the graph
        total = rows.sum() * 0.0
    if num_items_in_batch is None:
        return total / count
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _block_loss(
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor],
    vocab_size: int,
    ignore_index: int,
    rows: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    logits = transform(head(rows.unsqueeze(0)))
    return nn.functional.cross_entropy(
        logits.float().view(-1, vocab_size), targets, ignore_index=ignore_index, reduction="sum"
    )
