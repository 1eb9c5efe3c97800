"""Precise BatchNorm statistics: recompute a model's BatchNorm running mean and variance with its current weights
before it is evaluated.

BatchNorm layers evaluate with running statistics, an exponential average (momentum 0.1) of the batch statistics
seen while training, so after an epoch whose weights moved fast they describe weights that are gone, and
validation accuracy drops though the weights are fine (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm";
fvcore's PreciseBN, Facebook AI Research). `precise_bn=N` (TrainConfig) replaces them before every validation by
the plain average over N training batches of the batch statistics that the current weights give: the batches are
drawn from the train split with the training crops and flips, without random erasing or mixing (closer to what
evaluation sees), from a generator of their own (seeded by the run's seed and the epoch), so training's random
streams and a resume's bit-exact replay are untouched. The other layers stay in evaluation mode (no dropout).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import augment
from .device import autocast


def batchnorms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def train_batches(
    x_train: torch.Tensor, n: int, batch_size: int, crops: str, seed: int, epoch: int
) -> Iterator[torch.Tensor]:
    """`n` batches of `batch_size` training images, each with its training crops (and flips), channels-last."""
    gen = torch.Generator(device=x_train.device).manual_seed(1_000_003 * (seed + 1) + epoch)
    total = len(x_train)
    order = torch.randperm(total, generator=gen, device=x_train.device)
    per = min(batch_size, total)
    for b in range(n):
        start = (b * per) % total
        idx = order[start : start + per]
        if len(idx) < 2:  # BatchNorm needs two values per channel
            idx = order[:per]
        x = augment.train_batch(x_train[idx], gen, crops, erase_p=0.0)
        yield x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def recompute(model: torch.nn.Module, batches: Iterator[torch.Tensor], dtype: torch.dtype | None) -> int:
    """Reset the BatchNorm layers of `model` and set their running statistics to the average over `batches` of
    the batch statistics (BatchNorm's cumulative average, momentum None); the modes and momenta are put back.
    How many batches it saw (0: the model has no BatchNorm)."""
    bns = batchnorms(model)
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    seen = 0
    try:
        for x in batches:
            with autocast(x.device, dtype):
                model(x)
            seen += 1
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    return seen
