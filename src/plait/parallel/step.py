"""One step's forward and backward on the model a layout transformed: the language-model loss,
gradient accumulation over micro-batches, and evaluation.

`AccumulatedStep` runs every layout but the pipeline (which runs its own schedule over the
micro-batches: `plait.parallel.pipeline_parallel.Pipeline`); both offer `forward_backward`,
`evaluate` and `gather_whole`, so the training loop calls one object whatever the layout. What differs by
parallelism is set once, here, from the layout: the vocabulary-parallel loss context (tensor
parallelism), the split of each sequence over the context-parallel ranks, and DDP's gradient
all-reduce on the last micro-batch only.

Numerics: each micro-batch's loss is its mean token cross-entropy divided by the number of
micro-batches, so the gradients and the summed loss are those of the mean over the step's tokens
whatever the split (the parity tests hold every layout to the single-process curve).

Shape legend: B batch (sequences), T sequence, V vocabulary; `_BT1` is T + 1 tokens (inputs and
the shifted targets).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.context_parallel import ContextSharding
from plait.parallel.data_parallel import gradient_sync
from plait.parallel.gather import gather_model, plain_model
from plait.parallel.tensor_parallel import loss_parallel_context, tp_cross_entropy


class MicroBatchHooks(Protocol):
    """What the trainer adds to each micro-batch (mixture-of-experts: the balance loss before
    backward, the router statistics after it)."""

    def aux_loss(self) -> torch.Tensor | None: ...

    def observe(self, aux_loss: torch.Tensor | None) -> None: ...


def lm_loss(model: nn.Module, batch_BT1: torch.Tensor, autocast: AbstractContextManager,
            cp: ContextSharding | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch, in fp32. Under tensor parallelism the logits
    stay sharded on the vocabulary (call inside `loss_parallel_context`, backward included).
    Under context parallelism it is the mean over this rank's tokens of each sequence."""
    inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
    extra = {}
    if cp is not None:
        inputs_BT, targets_BT, extra["positions_T"] = cp.split(inputs_BT, targets_BT)
    with autocast:
        logits_BTV = model(inputs_BT, **extra)
    return tp_cross_entropy(logits_BTV, targets_BT)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                     autocast: AbstractContextManager, tp: bool = False, cp: ContextSharding | None = None) -> float:
    """Mean loss over `batches` (weighted by their sequences); every rank evaluates the same
    batches (sharded layouts need all), context-parallel ranks each their tokens of them."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        with loss_parallel_context(tp):
            loss = lm_loss(model, batch, autocast, cp)
            total += (cp.average(loss) if cp is not None else loss).item() * batch.shape[0]
        count += batch.shape[0]
    model.train()
    return total / count


class AccumulatedStep:
    """Forward and backward of a step's batch as micro-batches on this rank's model: gradients
    add up in the parameters and are averaged across the data-parallel ranks by the layout's
    wrapper (DDP on the last micro-batch, FSDP per micro-batch) or by its optimizer (ZeRO-1)."""

    def __init__(self, model: nn.Module, module: nn.Module, micro_batch_size: int, accumulation_steps: int,
                 tp: bool, cp: ContextSharding | None, autocast: AbstractContextManager, split: bool) -> None:
        self.model, self.module = model, module
        self.micro_batch_size, self.accumulation_steps = micro_batch_size, accumulation_steps
        self.tp, self.cp, self.autocast = tp, cp, autocast
        self.split = split  # the layout splits the parameters or the sequences over ranks

    def forward_backward(self, batch_BT1: torch.Tensor, hooks: MicroBatchHooks) -> torch.Tensor:
        """The step's loss (this rank's share, detached); gradients are left in the parameters."""
        step_loss = torch.zeros((), device=batch_BT1.device)
        micro_batches = batch_BT1.split(self.micro_batch_size)
        for i, micro in enumerate(micro_batches):
            with gradient_sync(self.model, last_micro_batch=i == len(micro_batches) - 1), loss_parallel_context(self.tp):
                loss = lm_loss(self.model, micro, self.autocast, self.cp) / self.accumulation_steps
                aux = hooks.aux_loss()
                aux = aux / self.accumulation_steps if aux is not None else None
                (loss + aux if aux is not None else loss).backward()
            step_loss += loss.detach()
            hooks.observe(aux)
        return step_loss

    def describe(self) -> str | None:
        return None  # nothing beyond the step's shape, which the run prints

    def evaluate(self, batches: Iterable[torch.Tensor], device: torch.device) -> float:
        """Validation loss on the unwrapped model (every rank the same number)."""
        return evaluate_batches(self.module, batches, device, self.autocast, self.tp, self.cp)

    def gather_whole(self, device: torch.device) -> nn.Module | None:
        """A one-process model with the whole weights on rank 0 (None on the others): gathered
        where the layout splits the parameters or the sequences (a collective), else the module
        itself, whole on every rank."""
        if not self.split:
            return self.module
        tensors = gather_model(self.model, distributed=True)
        return plain_model(self.module.args, tensors, device) if dist.get_rank() == 0 else None
