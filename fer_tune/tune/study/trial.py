"""One trial of a study inside Ray Tune: fit() with the trial's config, each epoch reported with a checkpoint."""

from __future__ import annotations

import os
import time
from typing import Any

from ..runtime.checkpoints import scalars
from ..runtime.trial import device_seconds, report, where

CRASH_ENV = "FER_TUNE_CRASH_ONCE"  # test hook "MARKER_FILE:EPOCH": the first trial to get there crashes once


def _crash_epoch(crash: str, trial_id: str) -> int | None:
    """The test hook CRASH_ENV: the epoch at which this trial crashes once (the first trial to claim the marker)."""
    if not crash:
        return None
    marker, _, epoch = crash.rpartition(":")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None
    os.write(fd, trial_id.encode())
    os.close(fd)
    return int(epoch)


def study_trial(
    config: dict, *, base: dict, data: dict, weight: float, crash: str = "", renames: dict | None = None
) -> None:
    """One trial of a study: fit() with the trial's config, each epoch reported to Tune with a checkpoint."""
    from ray import tune

    from ...config import TrainConfig
    from ...device import select_device
    from ...observers import FailAt
    from ...recipe import ArraySplits
    from ...train import fit, load_checkpoint, save_checkpoint
    from ..runtime.checkpoints import restore
    from .spec import train_keys

    cfg = TrainConfig.from_dict({**base, **train_keys(config, renames or {})}, source="trial config")
    checkpoint = tune.get_checkpoint()
    state = restore(checkpoint, lambda d: load_checkpoint(d / "state.pt")) if checkpoint is not None else None
    trial_id = tune.get_context().get_trial_id()
    fail_at = _crash_epoch(crash, trial_id)
    device = select_device()
    about = {
        **where(device),
        "start_epoch": int(state["epoch"]) if state else 0,
        "trial_start": time.time(),
        "trial_id": trial_id,
    }

    def on_epoch(metrics: dict, take: Any) -> bool | None:
        # the metric first: Tune's progress table shows the first few columns
        first = [k for k in ("val_acc", "best_val_acc", "epoch", "val_loss") if k in metrics]
        out = {**scalars({k: metrics[k] for k in first + [k for k in metrics if k not in first]}), **about}
        if take is None:  # diverged: no checkpoint, the study goes on
            out.setdefault("val_acc", 0.0)
            out["device_seconds"] = 0.0
            report(out, None)
            return False
        snapshot = take()
        out["device_seconds"] = device_seconds(weight, snapshot["history"])
        report(out, lambda d: save_checkpoint(snapshot, d / "state.pt"))
        return None

    crash = [FailAt(fail_at)] if fail_at is not None else []
    fit(cfg, data=ArraySplits(data), device=device, checkpoint=state, on_epoch=on_epoch, observers=crash)
