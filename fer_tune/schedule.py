"""Piecewise hyperparameter schedules: {epoch: {key: value}}, applied by fit() at the start of each listed epoch.

Population-based training (Jaderberg et al. 2017, "Population Based Training of Neural Networks") changes a
member's lr, weight decay and dropout while it trains: a member that clones another's weights at epoch k goes on
from epoch k + 1 with perturbed values. What a member followed is such a schedule, and fit(schedule=...) replays
it from scratch (`fer-tune final --from-pbt`). The same call makes a mutation take effect in a run continued from
a checkpoint: the optimizer's state (restored from the checkpoint) gets the new lr and weight decay, the model's
dropout layers the new rate.

An lr schedule replaces the config's scheduler, so it needs scheduler=constant.
"""

from __future__ import annotations

from typing import Any

from .common import FerTuneError
from .config import TrainConfig

MUTABLE = ("lr", "weight_decay", "dropout")  # what a schedule may change during a run
Schedule = dict[int, dict[str, float]]


def check_schedule(schedule: Any, cfg: TrainConfig) -> Schedule:
    """The schedule with int epochs and float values; FerTuneError for an unknown key, an epoch outside 1..epochs,
    a value the config refuses, or an lr schedule under a scheduler that sets the lr itself."""
    out: Schedule = {}
    for epoch, changes in dict(schedule or {}).items():
        try:
            e = int(epoch)
        except (TypeError, ValueError):
            raise FerTuneError(f"schedule: epoch {epoch!r} is not a whole number") from None
        if not 1 <= e <= cfg.epochs:
            raise FerTuneError(f"schedule: epoch {e} is outside the run's epochs 1..{cfg.epochs}")
        unknown = sorted(set(changes) - set(MUTABLE))
        if unknown:
            raise FerTuneError(f"schedule: {', '.join(unknown)} cannot change during a run (only {', '.join(MUTABLE)})")
        if "lr" in changes and cfg.scheduler != "constant":
            raise FerTuneError(
                f"schedule: an lr schedule replaces the scheduler, but the config says scheduler {cfg.scheduler}; "
                "set scheduler=constant"
            )
        cfg.replace(**changes)  # the values are valid for the config
        out[e] = {k: float(v) for k, v in changes.items()}
    return out


def in_effect(schedule: Schedule, epoch: int) -> dict[str, float]:
    """The values the schedule has set by the start of `epoch` (later entries win)."""
    values: dict[str, float] = {}
    for e in sorted(schedule):
        if e <= epoch:
            values.update(schedule[e])
    return values


def apply_schedule(schedule: Any, epoch: int, start: int, cfg: TrainConfig, model: Any, optimizer: Any) -> TrainConfig:
    """At the start of `epoch` of a run that began (or continued) after epoch `start`: the changes the schedule
    makes now (at the first epoch of the run, all it has made so far, since a resumed model is rebuilt from the
    config) set in the optimizer and the model; returns the config in effect."""
    if not schedule:
        return cfg
    plan = check_schedule(schedule, cfg)
    changes = in_effect(plan, epoch) if epoch == start + 1 else plan.get(epoch, {})
    if not changes:
        return cfg
    new = cfg.replace(**changes)
    for i, group in enumerate(optimizer.param_groups):
        if "lr" in changes:
            group["lr"] = new.lr
        if "weight_decay" in changes and not (new.no_wd_1d and i == 1):  # no_wd_1d: group 1 is never decayed
            group["weight_decay"] = new.weight_decay
    if "dropout" in changes:
        import torch

        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = new.dropout
    return new
