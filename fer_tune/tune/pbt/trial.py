"""One member of a population-based-training stage inside Ray Tune: fit() reporting each epoch with a checkpoint,
and the member's lineage.

Ray's PopulationBasedTraining (or PB2) restarts a member that falls behind from another's latest checkpoint with a
perturbed config. The member sees it here: the checkpoint it is handed was written by another trial. It then goes
on from that checkpoint's epoch k with the new lr / weight_decay / dropout from epoch k + 1 (fer_tune.schedule sets
them in the restored optimizer and model), and its lineage becomes the donor's plus this clone:

    {"trial_id": who wrote it, "origin": the top-K configuration the weights descend from,
     "schedule": [[first epoch, {key: value}], ...]  (the values the weights were trained with, per segment),
     "clones": [{"epoch", "from", "into", "old", "new", "value"}, ...]}  (every clone on the weights' way)

Every checkpoint holds lineage.json beside state.pt; every result carries the lineage as JSON and `since` (the
clone that brought the weights into this trial, "" for its own), so the population can be read back from the
results alone (fer_tune.tune.pbt.outputs). A clone continues its donor's random streams, so that the schedule
replays bit for bit from scratch on a CPU (`fer-tune final --from-pbt`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

ORIGIN = "origin"  # the config key naming the top-K configuration a member's weights descend from


def _load(d: Path) -> tuple[dict, dict]:
    from ...train import load_checkpoint

    return load_checkpoint(d / "state.pt"), json.loads((d / "lineage.json").read_text())


def continued(state: dict | None, lineage: dict | None, trial_id: str, values: dict, origin: int, epochs: int) -> tuple:
    """(lineage, schedule for fit, since) of a member that starts fresh (state None), continues its own
    checkpoint, or goes on from another member's (a clone). Values that differ from the checkpoint's (a clone's
    perturbed ones; or a config Tune restored after a crash beside an older checkpoint) take effect from the next
    epoch on and start a segment of the schedule."""
    if state is None or lineage is None:
        return {"origin": origin, "schedule": [[1, values]], "clones": []}, None, ""
    epoch = int(state["epoch"])
    old = {k: state["config"][k] for k in values}
    changes = {k: v for k, v in values.items() if v != old[k]}
    schedule = [s for s in lineage["schedule"] if s[0] <= epoch]
    clones, since = list(lineage["clones"]), lineage.get("since", "")
    if lineage["trial_id"] != trial_id:
        value = (state.get("history") or [{}])[-1].get("val_acc")
        clones.append(
            {"epoch": epoch, "from": lineage["trial_id"], "into": trial_id, "old": old, "new": values, "value": value}
        )
        since = f"{lineage['trial_id']}@{epoch}"
    plan = None
    if changes and epoch < epochs:  # at the last epoch nothing is left to train with them
        schedule.append([epoch + 1, values])
        plan = {epoch + 1: changes}
    return {"origin": origin, "schedule": schedule, "clones": clones}, plan, since


def member_trial(config: dict, *, bases: list, data: dict, weight: float, mutate: list) -> None:
    """A member: its top-K configuration (bases[origin]) with the mutated keys from the trial's config."""
    from ray import tune

    from ...config import TrainConfig
    from ...device import select_device
    from ...recipe import ArraySplits
    from ...train import fit, save_checkpoint
    from ..runtime.checkpoints import restore, scalars
    from ..runtime.trial import device_seconds, report, where

    origin = int(config[ORIGIN])
    cfg = TrainConfig.from_dict({**bases[origin], **{k: config[k] for k in mutate}}, source="member config")
    values = {k: getattr(cfg, k) for k in mutate}
    trial_id = tune.get_context().get_trial_id()
    ckpt = tune.get_checkpoint()
    state, lineage = (restore(ckpt, _load) if ckpt is not None else None) or (None, None)
    lineage, schedule, since = continued(state, lineage, trial_id, values, origin, cfg.epochs)
    lineage = {**lineage, "trial_id": trial_id, "since": since}
    device = select_device()
    about = {**where(device), "start_epoch": int(state["epoch"]) if state else 0}

    def on_epoch(metrics: dict, take: Any) -> bool | None:
        out = scalars(metrics)
        out.update(
            lineage["schedule"][-1][1],  # the values in effect (a clone at the last epoch trained none of its own)
            origin=origin,
            trial_id=trial_id,
            since=since,
            lineage=json.dumps(lineage),
            reported_at=time.time(),
            **about,
        )
        if take is None:  # diverged: no checkpoint; the member ends
            out.setdefault("val_acc", 0.0)
            report(out, None)
            return False
        snapshot = take()
        out["device_seconds"] = device_seconds(weight, snapshot["history"])

        def write(d: Path) -> None:
            save_checkpoint(snapshot, d / "state.pt")
            (d / "lineage.json").write_text(json.dumps(lineage))

        report(out, write)
        return None

    if state is not None and state["epoch"] >= cfg.epochs:  # a clone of a finished member: its end is this one's
        on_epoch({**state["history"][-1], "status": "running"}, lambda: state)
        return
    fit(cfg, data=ArraySplits(data), device=device, checkpoint=state, on_epoch=on_epoch, schedule=schedule)
