"""What a model costs to run: the cost metrics every trial reports beside its accuracy.

- ``params``: trainable parameters, in millions;
- ``mflops``: forward MFLOPs per 40x40 crop, counted by torch.utils.flop_counter (convolutions and matrix
  products, 2 FLOPs per multiply-add; batch norm, ReLU and pooling are not counted): deterministic, the same on
  every machine;
- ``latency_ms``: measured wall time of one image's prediction with the test crops (TenCrop: 10 crops in one
  forward pass), batch 1, on the trial's device and precision, the median of ``LATENCY_RUNS`` runs after a warm-up.
  It is a measurement: on a machine whose cores or GPU are shared with other trials it moves by tens of percent
  between identical models.

A multi-objective study can minimise any of them (``metric: [val_acc, mflops]``, ``mode: [max, min]``). The
module imports torch only when it measures: a study's driver reads COST_METRICS without it.
"""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

COST_METRICS = ("params", "mflops", "latency_ms")
LATENCY_WARMUP = 3
LATENCY_RUNS = 10


def count_mflops(model: torch.nn.Module, device: torch.device) -> float:
    """Forward MFLOPs of one 40x40 crop (eval mode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from . import augment

    x = torch.zeros(1, 1, augment.CROP, augment.CROP, device=device).contiguous(memory_format=torch.channels_last)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 1e6


def measure_latency_ms(model: torch.nn.Module, device: torch.device, crops: str, dtype: torch.dtype | None) -> float:
    """Median ms to predict one 48x48 image with `crops` (crops -> forward -> mean of logits), batch 1."""
    import torch

    from . import augment
    from .device import autocast

    image = torch.full((1, augment.SIZE, augment.SIZE), 128, dtype=torch.uint8, device=device)
    n = augment.crops_per_image(crops)

    def once() -> float:
        t0 = time.perf_counter()
        x = augment.eval_batch(image, crops).contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(x)
        logits.float().view(-1, n, logits.shape[-1]).mean(1).argmax(1).cpu()  # the answer on the host: synced
        return time.perf_counter() - t0

    with torch.no_grad():
        for _ in range(LATENCY_WARMUP):
            once()
        return 1000.0 * statistics.median(once() for _ in range(LATENCY_RUNS))


def model_cost(model: torch.nn.Module, device: torch.device, crops: str, dtype: torch.dtype | None) -> dict:
    """{params, mflops, latency_ms} of `model` (left in eval mode; fit sets train mode each epoch)."""

    model.eval()
    return {
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "mflops": count_mflops(model, device),
        "latency_ms": measure_latency_ms(model, device, crops, dtype),
    }
