"""One trial of a study inside Ray Tune: fit() with the trial's config, each epoch reported with a checkpoint."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ..runtime.trial import memory_mb

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
    import ray
    from ray import tune

    from ...config import TrainConfig
    from ...device import select_device
    from ...recipe import ArraySplits
    from ...train import fit, load_checkpoint, save_checkpoint
    from ..runtime.checkpoints import restore, write_meta
    from .spec import train_keys

    cfg = TrainConfig.from_dict({**base, **train_keys(config, renames or {})}, source="trial config")
    checkpoint = tune.get_checkpoint()
    state = restore(checkpoint, lambda d: load_checkpoint(d / "state.pt")) if checkpoint is not None else None
    trial_start = time.time()
    trial_id = tune.get_context().get_trial_id()
    fail_at = _crash_epoch(crash, trial_id)
    start_epoch = int(state["epoch"]) if state else 0
    node = ray.util.get_node_ip_address()
    node_id = ray.get_runtime_context().get_node_id()[:12]
    device = select_device()

    def on_epoch(metrics: dict, st: dict | None) -> bool | None:
        # the metric first: Tune's progress table shows the first few columns
        first = [k for k in ("val_acc", "best_val_acc", "epoch", "val_loss") if k in metrics]
        out = {
            k: metrics[k]
            for k in first + [k for k in metrics if k not in first]
            if isinstance(metrics[k], (int, float, str, bool))
        }
        out.update(
            node=node,
            node_id=node_id,
            device=str(device),
            start_epoch=start_epoch,
            trial_start=trial_start,
            trial_id=trial_id,
            **memory_mb(),
        )
        if st is None:  # diverged: no checkpoint, the study goes on
            out.setdefault("val_acc", 0.0)
            out["device_seconds"] = 0.0
            tune.report(out)
            return False
        out["device_seconds"] = weight * sum(h["epoch_seconds"] for h in st["history"])
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(st, Path(d) / "state.pt")
            write_meta(Path(d), out)
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))
        return None

    fit(cfg, data=ArraySplits(data), device=device, checkpoint=state, on_epoch=on_epoch, fail_at_epoch=fail_at)
