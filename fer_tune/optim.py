"""Optimizers and learning-rate schedules from a TrainConfig, behind one small interface for the training loop.

optimizer = create_optimizer(cfg, model.parameters())
scheduler = Scheduler(cfg, optimizer, steps_per_epoch)
... per batch:  optimizer.step(); scheduler.after_batch()
... per epoch:  scheduler.after_epoch(val_acc)
scheduler.state_dict() / load_state_dict(): with the optimizer's state, a resumed run continues identically.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import lr_scheduler

from .common import FerTuneError
from .config import TrainConfig


def create_optimizer(cfg: TrainConfig, params: Iterable, device: torch.device | None = None) -> torch.optim.Optimizer:
    """cfg.optimizer with cfg.lr and cfg.weight_decay (and cfg.momentum for sgd / sgd_nesterov). On CUDA, SGD,
    Adam and AdamW use their fused kernels (one launch for all parameters); elsewhere torch's defaults."""
    lr, wd, name = cfg.lr, cfg.weight_decay, cfg.optimizer
    fused = {"fused": True} if device is not None and device.type == "cuda" else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd, **fused)
    if name == "sgd_nesterov":
        if cfg.momentum <= 0:
            raise FerTuneError("optimizer sgd_nesterov needs momentum > 0 (use optimizer sgd for plain SGD)")
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd, nesterov=True, **fused)
    if name == "asgd":
        return torch.optim.ASGD(params, lr=lr, weight_decay=wd)
    if name in ("adam", "amsgrad"):
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, amsgrad=name == "amsgrad", **fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, **fused)
    if name == "adadelta":
        return torch.optim.Adadelta(params, lr=lr, weight_decay=wd)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    raise FerTuneError(f"unknown optimizer {name!r}")


class Scheduler:
    """cfg.scheduler as one interface: per-batch (onecycle) or per-epoch (the rest) stepping, lr, state."""

    def __init__(self, cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        self.kind = cfg.scheduler
        self.optimizer = optimizer
        self._sched: lr_scheduler.LRScheduler | None
        if self.kind == "constant":
            self._sched = None
        elif self.kind == "rlrp":
            self._sched = lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=cfg.factor, patience=cfg.patience
            )
        elif self.kind == "cosine":
            self._sched = lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.eta_min)
        elif self.kind == "cosine_wr":
            self._sched = lr_scheduler.CosineAnnealingWarmRestarts(
                optimizer, T_0=cfg.t_0, T_mult=cfg.t_mult, eta_min=cfg.eta_min
            )
        elif self.kind == "step":
            self._sched = lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
        elif self.kind == "onecycle":
            if steps_per_epoch < 1:
                raise FerTuneError(f"onecycle needs steps_per_epoch >= 1, got {steps_per_epoch}")
            # cycle momentum (beta1) only where the optimizer has one in use: ASGD, Adadelta, Adagrad and
            # momentum-free SGD keep theirs untouched
            d = optimizer.defaults
            cycle = "betas" in d or d.get("momentum", 0) > 0
            self._sched = lr_scheduler.OneCycleLR(
                optimizer, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, cycle_momentum=cycle
            )
        else:
            raise FerTuneError(f"unknown scheduler {self.kind!r}")

    def _step(self, *args: Any) -> None:
        # A GradScaler that skips the very first optimizer step (fp16 overflow) makes torch warn that the
        # scheduler stepped first; that is expected here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self._sched.step(*args)

    def after_batch(self) -> None:
        """Call after each optimizer step: advances onecycle; no-op otherwise.

        OneCycleLR's lrs are steps 0 .. total_steps - 1 (the last is its minimum); it stops there, as torch would
        otherwise extrapolate the cosine back up on the extra step after the final batch.
        """
        if self.kind == "onecycle" and self._sched.last_epoch < self._sched.total_steps - 1:
            self._step()

    def after_epoch(self, val_acc: float) -> None:
        """Call once per epoch with the validation accuracy (used by rlrp only)."""
        if self.kind == "rlrp":
            self._step(float(val_acc))
        elif self.kind in ("cosine", "cosine_wr", "step"):
            self._step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """Plain data (loads with torch.load(weights_only=True)); pair it with the optimizer's state_dict."""
        return {"kind": self.kind, "state": None if self._sched is None else self._sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kind = state.get("kind") if isinstance(state, dict) else None
        if kind != self.kind:
            raise FerTuneError(
                f"the saved scheduler state is for {kind!r}, but the config says scheduler "
                f"{self.kind!r}; a resumed run must keep its scheduler"
            )
        if self._sched is not None:
            self._sched.load_state_dict(state["state"])
