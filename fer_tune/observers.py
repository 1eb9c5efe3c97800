"""Observers of fit()'s loop (fer_tune.train.Observer): what a caller watches or adds without the loop knowing it.

- ProgressBar: `fer-tune train`'s tqdm bar over the run's batches, with the epoch's loss and val accuracy;
- TrackedTest: the final stage's overfitting curve, accuracy on images outside the selection (the test split)
  every N epochs and at the last one, as `test_acc` (never used to choose anything);
- FailAt: a crash at the start of an epoch, for the tests of a study's failure handling.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import TrainConfig
from .train import Observer, as_tensor, predict_logits


class ProgressBar(Observer):
    def __init__(self) -> None:
        self.bar: Any = None
        self.best = float("-inf")

    def on_fit_start(self, cfg: TrainConfig, device: torch.device, dtype: Any, start: int, steps: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=(cfg.epochs - start) * steps, unit="batch", dynamic_ncols=True, leave=True)

    def on_batch_end(self) -> None:
        self.bar.update(1)

    def on_epoch_end(self, metrics: dict) -> None:
        self.bar.set_postfix(
            epoch=metrics["epoch"],
            loss=f"{metrics['train_loss']:.3f}",
            val_acc=f"{metrics['val_acc']:.2f}",
            best=f"{metrics['best_val_acc']:.2f}",
        )

    def on_fit_end(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TrackedTest(Observer):
    """`test_acc` of (images, labels) every `every` epochs (0: only the last) and at the last epoch, with `crops`
    (default: the config's test crops)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, every: int = 0, crops: str | None = None):
        self.arrays, self.every, self.crops = (images, labels), every, crops

    def on_fit_start(self, cfg: TrainConfig, device: torch.device, dtype: Any, start: int, steps: int) -> None:
        self.cfg, self.dtype = cfg, dtype
        self.x, self.y = (as_tensor(a, device) for a in self.arrays)

    def on_validation_end(self, epoch: int, metrics: dict, model: torch.nn.Module) -> None:
        cfg = self.cfg
        if epoch == cfg.epochs or (self.every and epoch % self.every == 0):
            crops = self.crops or cfg.test_crops
            logits = predict_logits(model, self.x, crops=crops, batch_size=cfg.eval_batch_size, dtype=self.dtype)
            metrics["test_acc"] = 100.0 * float((logits.argmax(1) == self.y).float().mean())


class FailAt(Observer):
    """A RuntimeError at the start of `epoch` (a test's injected crash)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == self.epoch:
            raise RuntimeError(f"injected failure at epoch {epoch} (test hook)")
