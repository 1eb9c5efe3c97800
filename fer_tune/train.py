"""fit(): the ONE epoch loop. `fer-tune train`, every Ray Tune trial and the final stage call it.

It knows nothing about Ray. It takes a TrainConfig, the data (anything with ``.arrays(split)``), a device, an
optional starting checkpoint, a callback ``on_epoch(metrics, take) -> bool | None`` called after every epoch
(``take()`` builds that epoch's checkpoint, a CPU copy, only for a caller that keeps one; return False to stop)
and observers of the loop (fer_tune.observers: the progress bar, the tracked test curve). The data moves to the device once; batches are augmented there (fer_tune.augment).
A checkpoint is a plain dict (model, optimizer, scheduler, AMP scaler, RNG states, epoch, history, best) that
``save_checkpoint`` writes atomically and ``load_checkpoint`` reads with ``weights_only=True``; resuming from
epoch k reproduces the uninterrupted run on CPU.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import augment, precise_bn
from .common import EMOTIONS, FerTuneError, atomic_path
from .config import TrainConfig
from .cost import model_cost
from .device import autocast, compile_model, precision, precision_name, prepare_device, resumed_precision, select_device
from .models import Ensemble, create_model, load_tensor_file, not_torch_file
from .optim import Scheduler, create_optimizer
from .regularize import Additions, mixed_correct, mixed_loss, param_groups
from .schedule import apply_schedule

CHECKPOINT_FORMAT = 1


class Arrays(Protocol):
    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class FitResult:
    status: str  # completed | stopped | diverged
    message: str
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    checkpoint: dict | None = None  # the last epoch's checkpoint (a diverged run's: the last one taken, if any)
    precision: str = "fp32"  # bf16 | fp16 | fp32: the autocast dtype the run trained with
    compiled: bool = False  # whether torch.compile ran the model (compile=on, or auto where it pays)


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    model = create_model(cfg.model, width=cfg.width, dropout=cfg.dropout, weights=cfg.weights or None)
    # channels_last on every device: CUDA (tensor cores) and CPU (oneDNN; benchmarks/RESULTS.md, "channels_last on
    # CPU")
    return model.to(device).to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------
def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """torch.save, atomically (fer_tune.common.atomic_path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, usage: str = "") -> dict:
    """A fer-tune checkpoint or model.pt; `usage` (a command's synopsis) is added to the error for a file that is
    not one, as when an image or a CSV is given where the model goes."""
    path = Path(path)
    hint = f" (usage: {usage})" if usage else ""
    kind = not_torch_file(path) if usage and path.is_file() else ""
    if kind:
        raise FerTuneError(f"{path} is not a fer-tune model: it is {kind}{hint}")
    try:
        state = load_tensor_file(path, "checkpoint")
    except FerTuneError as exc:
        raise FerTuneError(f"{exc}{hint}") from None
    if not isinstance(state, dict) or not ("model" in state or "members" in state) or "config" not in state:
        raise FerTuneError(f"{path} is not a fer-tune checkpoint (no model/config in it){hint}")
    return state


def trained_on(state: dict) -> dict:
    """The data a checkpoint's model was trained on (FerData.describe() and the test crops its scores used), as
    `fer-tune train` and the final stage record them; {} for a file that predates the record."""
    return dict(state.get("data") or {})


def model_from_checkpoint(state: dict, device: torch.device) -> tuple[torch.nn.Module, TrainConfig]:
    """The model of a checkpoint or model.pt, in eval mode on `device`, and its config; an ensemble's model.pt
    (a "members" list of {"config", "model"}, fer_tune.export.export_ensemble) gives the Ensemble of its members."""
    cfg = TrainConfig.from_dict({**state["config"], "weights": ""}, source="checkpoint config")
    if "members" in state:
        model = Ensemble([model_from_checkpoint(member, device)[0] for member in state["members"]])
    else:
        model = build_model(cfg, device)
        model.load_state_dict(state["model"])
    model.eval()
    return model, cfg


def _cpu_state(sd: Any) -> Any:
    if isinstance(sd, torch.Tensor):
        return sd.detach().to("cpu", copy=True)
    if isinstance(sd, dict):
        return {k: _cpu_state(v) for k, v in sd.items()}
    if isinstance(sd, (list, tuple)):
        return type(sd)(_cpu_state(v) for v in sd)
    return sd


# ---------------------------------------------------------------------------------------------------------
# evaluation pass (used each epoch and by fer_tune.evaluate)
# ---------------------------------------------------------------------------------------------------------
# Crops per evaluation forward pass on a CPU when the batch size is auto: a batch whose activations stay in the
# caches beats a large one (benchmarks/bench_eval_batch.py; RESULTS.md, "Evaluation batch size on CPU"). GPUs want
# large batches.
CPU_EVAL_CROPS = 128
CUDA_EVAL_IMAGES = 256


def eval_images_per_batch(device: torch.device, crops: str, batch_size: int = 0) -> int:
    """`batch_size` images per evaluation pass if > 0, else auto: 256 on CUDA, 128 crops' worth on CPU."""
    if batch_size > 0:
        return batch_size
    if device.type == "cuda":
        return CUDA_EVAL_IMAGES
    return max(1, CPU_EVAL_CROPS // augment.crops_per_image(crops))


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, images: torch.Tensor, *, crops: str, batch_size: int = 0, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Logits averaged over the test crops (TenCrop as the paper), float32 (N, 7), on the images' device;
    `batch_size` images per forward pass (0: auto, see eval_images_per_batch)."""
    return crop_logits(model, images, crops=crops, batch_size=batch_size, dtype=dtype).mean(1)


@torch.no_grad()
def crop_logits(
    model: torch.nn.Module, images: torch.Tensor, *, crops: str, batch_size: int = 0, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Each test crop's logits, float32 (N, crops, 7): what predict_logits averages."""
    model.eval()
    n_crops = augment.crops_per_image(crops)
    batch_size = eval_images_per_batch(images.device, crops, batch_size)
    out = []
    for i in range(0, len(images), batch_size):
        x = augment.eval_batch(images[i : i + batch_size], crops)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(images.device, dtype):
            logits = model(x)
        out.append(logits.float().view(-1, n_crops, logits.shape[-1]))
    return torch.cat(out) if out else torch.zeros(0, n_crops, 7, device=images.device)


def as_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A tensor on `device` without copying on CPU. Arrays from Ray's object store are read-only shared memory;
    the loop only ever reads them (batches are gathered copies), so torch's not-writable warning is moot."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _val_recall(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """{val_recall_<emotion>: recall in percent} for the classes present in the val split."""
    n = len(EMOTIONS)
    support = torch.bincount(labels, minlength=n)
    hits = torch.bincount(labels[logits.argmax(1) == labels], minlength=n)
    recall = (100.0 * hits / support.clamp_min(1)).tolist()
    return {f"val_recall_{e}": recall[i] for i, e in enumerate(EMOTIONS) if int(support[i])}


# ---------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------
class Observer:
    """Watches fit()'s loop, as Lightning's Callback does a Trainer's: a progress bar, the tracked test curve, a
    test's injected crash (fer_tune.observers). Every hook is a no-op here; on_validation_end may add metrics
    (before they enter the history)."""

    def on_fit_start(self, cfg: TrainConfig, device: torch.device, dtype: Any, start: int, steps: int) -> None: ...
    def on_epoch_start(self, epoch: int) -> None: ...
    def on_batch_end(self) -> None: ...
    def on_validation_end(self, epoch: int, metrics: dict, model: torch.nn.Module) -> None: ...
    def on_epoch_end(self, metrics: dict) -> None: ...
    def on_fit_end(self) -> None: ...


class _Run:
    """What one run trains and steps, built from its config; `snapshot` and `restore` are each other's inverse
    (the checkpoint format, CHECKPOINT_FORMAT)."""

    def __init__(self, cfg: TrainConfig, device: torch.device, steps: int, n_train: int, use_scaler: bool, init: Any):
        self.device, self.use_scaler, self.n_train = device, use_scaler, n_train
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.model = build_model(cfg, device)
        self.optimizer = create_optimizer(cfg, param_groups(self.model, cfg.weight_decay, cfg.no_wd_1d), device)
        self.scheduler = Scheduler(cfg, self.optimizer, steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        if init is not None:  # a fine-tune's starting weights
            self.model.load_state_dict(init)
        self.extra = Additions(cfg, self.model, n_train, device)

    def snapshot(self, cfg: TrainConfig, prec: str, epoch: int, history: list, best: dict) -> dict:
        """The checkpoint after `epoch`: a CPU copy of everything a resume needs."""
        device = self.device
        return {
            "format": CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "precision": prec,
            "epoch": epoch,
            "model": _cpu_state(self.extra.evaluated(self.model).state_dict()),
            **{k: _cpu_state(v) for k, v in self.extra.state(self.model).items()},
            "optimizer": _cpu_state(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_scaler else {},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "gen": self.gen.get_state(),
                "gen_device": device.type,
            },
            "history": list(history),
            "best": dict(best),
        }

    def restore(self, checkpoint: dict) -> tuple[list[dict], dict, int]:
        """Back to a snapshot; (history, best, the epoch it was taken after)."""
        self.model.load_state_dict(checkpoint["model"])
        self.extra.resume(checkpoint, self.model)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if rng.get("gen_device") == self.device.type:
            self.gen.set_state(rng["gen"])
        return list(checkpoint.get("history", [])), dict(checkpoint.get("best", {})), int(checkpoint["epoch"])

    def train_epoch(self, cfg, x_train, y_train, steps, epoch, dtype, observers) -> tuple[float, float, float]:
        """One pass over the train split: (mean loss, accuracy %, seconds)."""
        t0, device, model, extra, bs = time.perf_counter(), self.device, self.model, self.extra, cfg.batch_size
        n_crops = augment.crops_per_image(cfg.train_crops)
        model.train()
        perm = torch.randperm(self.n_train, generator=self.gen, device=device)
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for b in range(steps):
            idx = perm[b * bs : (b + 1) * bs]
            x = augment.train_batch(x_train[idx], self.gen, cfg.train_crops, cfg.erase_p, extra.flips(idx, epoch))
            x, y, y_b, lam = extra.mix(
                x, y_train[idx].repeat_interleave(n_crops), n_crops, self.gen, (cfg.seed, epoch, b)
            )
            x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, dtype):
                logits = model(x)
                loss = mixed_loss(logits.float(), y, y_b, lam, cfg.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.after_batch()
            extra.after_step(model)
            loss_sum += loss.detach() * len(y)
            correct += mixed_correct(logits, y, y_b, lam)
            seen += len(y)
            for o in observers:
                o.on_batch_end()
        return float(loss_sum) / seen, 100.0 * float(correct) / seen, time.perf_counter() - t0


Take = Callable[[], dict]  # an epoch's checkpoint, built (a CPU copy) when first asked for


def fit(
    cfg: TrainConfig,
    data: Arrays,
    *,
    device: torch.device | None = None,
    checkpoint: dict | None = None,
    on_epoch: Callable[[dict, Take | None], bool | None] | None = None,
    init_model: dict | None = None,
    schedule: dict | None = None,
    observers: Sequence[Observer] = (),
) -> FitResult:
    """Train ``cfg.epochs`` epochs (continuing from ``checkpoint`` if given); see the module docstring.

    ``on_epoch(metrics, take)`` after every epoch: ``take()`` returns its checkpoint (None for an epoch that
    diverged), to be called before on_epoch returns; return False to stop. ``init_model``: weights to start from
    when not resuming (a fine-tune). ``schedule``: {epoch: {key: value}} changes of lr / weight_decay / dropout from
    that epoch on (fer_tune.schedule). ``observers``: watchers of the loop (fer_tune.observers).
    """
    device = device or select_device()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype, use_scaler = (
        precision(device, cfg.amp) if checkpoint is None else resumed_precision(device, cfg.amp, checkpoint)
    )
    prec = precision_name(dtype)
    prepare_device(device)
    torch.manual_seed(cfg.seed)
    x_train, y_train = (as_tensor(a, device) for a in data.arrays("train"))
    x_val, y_val = (as_tensor(a, device) for a in data.arrays("val"))
    n_train, bs = len(y_train), cfg.batch_size
    # drop a last batch too small for BatchNorm in train mode
    steps = n_train // bs + (1 if (n_train % bs) * augment.crops_per_image(cfg.train_crops) >= 2 else 0)
    if steps == 0:
        raise FerTuneError(f"the train split has {n_train} images: too few for batch_size {bs}")

    run = _Run(cfg, device, steps, n_train, use_scaler, init_model if checkpoint is None else None)
    cost = model_cost(run.model, device, cfg.test_crops, dtype)  # eager, before a compile sees a batch of one
    compiled = compile_model(run.model, cfg.compile, device)  # after Additions: an EMA copies the eager model
    history, best, start = run.restore(checkpoint) if checkpoint is not None else ([], {}, 0)

    for o in observers:
        o.on_fit_start(cfg, device, dtype, start, steps)
    status, message = "completed", f"trained {cfg.epochs} epochs"
    taken: dict = {"epoch": start, "state": checkpoint}  # the latest epoch's checkpoint, once built
    try:
        for epoch in range(start + 1, cfg.epochs + 1):
            for o in observers:
                o.on_epoch_start(epoch)
            cfg = apply_schedule(schedule, epoch, start, cfg, run.model, run.optimizer)
            t0, lr = time.perf_counter(), run.scheduler.lr
            train_loss, train_acc, train_time = run.train_epoch(cfg, x_train, y_train, steps, epoch, dtype, observers)
            if not math.isfinite(train_loss):
                status = "diverged"
                message = (
                    f"training diverged at epoch {epoch}: the loss became {train_loss} "
                    f"(lr {lr:g}, optimizer {cfg.optimizer}); try a smaller lr"
                )
                metrics = {"epoch": epoch, "train_loss": train_loss, "status": "diverged", "lr": lr, "precision": prec}
                if on_epoch is not None:
                    on_epoch(metrics, None)
                break
            evaluated = run.extra.evaluated(run.model)
            if cfg.precise_bn:  # BatchNorm statistics of the current weights (fer_tune.precise_bn)
                batches = precise_bn.train_batches(x_train, cfg.precise_bn, bs, cfg.train_crops, cfg.seed, epoch)
                precise_bn.recompute(evaluated, batches, dtype)
            logits = predict_logits(evaluated, x_val, crops=cfg.test_crops, batch_size=cfg.eval_batch_size, dtype=dtype)
            val_loss = float(F.cross_entropy(logits, y_val))
            val_acc = 100.0 * float((logits.argmax(1) == y_val).float().mean())
            run.scheduler.after_epoch(val_acc)
            is_best = not best or val_acc > best["val_acc"]
            metrics = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": lr,
                "epoch_seconds": time.perf_counter() - t0,
                "images_per_s": n_train / train_time,
            }
            if device.type == "cuda":  # this process's peak (a trial's, on a fractional GPU); no device sync
                metrics["gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            for o in observers:
                o.on_validation_end(epoch, metrics, evaluated)
            if is_best:
                best = {"epoch": epoch, "val_acc": val_acc, "val_loss": val_loss}
            metrics.update(best_val_acc=best["val_acc"], best_epoch=best["epoch"], is_best=is_best, status="running")
            history.append({k: v for k, v in metrics.items() if k not in ("is_best", "status")})
            metrics.update(precision=prec, compiled=compiled, **cost)
            metrics.update(_val_recall(logits, y_val))  # for the study report's class-aware view, not history
            taken.update(epoch=epoch, state=None)
            for o in observers:
                o.on_epoch_end(metrics)
            if on_epoch is not None and on_epoch(metrics, _taker(taken, run, cfg, prec, history, best)) is False:
                status, message = "stopped", f"stopped by the caller after epoch {epoch}"
                break
        if status != "diverged" and taken["state"] is None:
            taken["state"] = run.snapshot(cfg, prec, taken["epoch"], history, best)
    finally:
        for o in observers:
            o.on_fit_end()
    return FitResult(status, message, history, best, taken["state"], prec, compiled)


def _taker(taken: dict, run: _Run, cfg: TrainConfig, prec: str, history: list, best: dict) -> Take:
    """take() for the epoch in `taken`: its snapshot, built on the first call and kept in `taken`; refused once
    the loop has moved on (the weights are no longer that epoch's)."""
    epoch = taken["epoch"]

    def take() -> dict:
        if taken["epoch"] != epoch:
            raise RuntimeError(f"fit(): the checkpoint of epoch {epoch} is taken inside on_epoch, not after")
        if taken["state"] is None:
            taken["state"] = run.snapshot(cfg, prec, epoch, history, best)
        return taken["state"]

    return take
