"""A validated search space (StudySpec): its parameters, the Optuna define-by-run function, sampler and the
TrainConfig of a trial. fer_tune.tune.study.spaces reads and validates space files into it."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...config import TrainConfig
from ...cost import COST_METRICS


@dataclass
class Param:
    name: str
    type: str
    choices: list = field(default_factory=list)  # categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    value: Any = None  # fixed
    when: dict[str, list] = field(default_factory=dict)  # {earlier param: [values that enable this one]}
    key: str = ""  # the training key it sets (default: its name)

    def __post_init__(self) -> None:
        self.key = self.key or self.name

    def to_dict(self) -> dict:
        keep = {
            "categorical": ("choices",),
            "float": ("low", "high", "log", "step"),
            "int": ("low", "high", "log", "step"),
            "fixed": ("value",),
        }[self.type]
        out = {"type": self.type, **{k: v for k in keep if (v := getattr(self, k)) is not None and v is not False}}
        if self.when:
            out["when"] = self.when
        if self.key != self.name:
            out["key"] = self.key
        return out


KEEP_DEFAULT = 4  # keep_checkpoints: once trials finish, the K best completed ones keep their best (footprint.py)


@dataclass
class StudySpec:
    name: str
    description: str = ""
    # the objectives: one metric (and mode) per objective; the first drives early stopping and the final stage
    metrics: list[str] = field(default_factory=lambda: ["val_acc"])
    modes: list[str] = field(default_factory=lambda: ["max"])
    sampler: str = "tpe"
    seed: int = 0
    num_samples: int = 10
    max_epochs: int = 10
    early_stopping: dict = field(default_factory=lambda: {"type": "asha", "grace_period": 1, "reduction_factor": 2})
    keep_checkpoints: int | str = KEEP_DEFAULT  # the K best completed trials keep their best checkpoint, or "all"
    warm_start: str = "paper"  # paper: the paper's recipe is trial 0 when the space can express it; none: off
    resources: dict = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    data: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    space: dict[str, Param] = field(default_factory=dict)
    source: str = ""
    text: str = ""

    @property
    def metric(self) -> str:
        return self.metrics[0]

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def base_config(self) -> dict:
        """The TrainConfig every trial starts from: defaults + fixed + epochs = max_epochs."""
        return TrainConfig.from_dict({**self.fixed, "epochs": self.max_epochs}, source=self.source).to_dict()

    def grid(self) -> dict[str, list]:
        return {p.name: list(p.choices) for p in self.space.values() if p.type == "categorical"}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def epoch_budget(self) -> dict:
        """Trial-epochs the study may take: `worst` (every trial runs max_epochs), `rungs` (ASHA's milestones:
        grace_period * reduction_factor^k below max_epochs) and `expected` (ASHA keeping 1/reduction_factor of the
        trials at each rung, the share it promotes once many trials have reported; None for median stopping)."""
        n, top, es = self.num_samples, self.max_epochs, self.early_stopping
        out: dict = {"worst": n * top, "rungs": [], "expected": n * top if es["type"] == "none" else None}
        if es["type"] == "asha":
            rungs, r = [], es["grace_period"]
            while r < top:
                rungs.append(r)
                r *= es["reduction_factor"]
            per_trial, before, share = 0.0, 0, 1.0
            for r in [*rungs, top]:
                per_trial += share * (r - before)
                before, share = r, share / es["reduction_factor"]
            out.update(rungs=rungs, expected=n * per_trial)
        return out

    def renames(self) -> dict[str, str]:
        """{parameter name: training key} for the parameters whose name is not their key."""
        return {p.name: p.key for p in self.space.values() if p.key != p.name}

    def trial_config(self, params: dict) -> TrainConfig:
        return TrainConfig.from_dict(
            {**self.base_config(), **train_keys(params, self.renames())}, source=f"{self.source}: trial params"
        )

    def define_by_run(self) -> Callable:
        """The Optuna define-by-run function: suggests the searched params, returns the fixed ones."""
        params = list(self.space.values())

        def define(trial) -> dict:
            chosen: dict[str, Any] = {}
            constants: dict[str, Any] = {}
            for p in params:
                if any(chosen.get(k, constants.get(k)) not in vals for k, vals in p.when.items()):
                    continue
                if p.type == "fixed":
                    constants[p.name] = p.value
                elif p.type == "categorical":
                    chosen[p.name] = trial.suggest_categorical(p.name, p.choices)
                elif p.type == "float":
                    chosen[p.name] = trial.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step)
                else:
                    chosen[p.name] = trial.suggest_int(p.name, p.low, p.high, log=p.log, step=p.step or 1)
            return constants

        return define

    def make_sampler(self, seed: int | None = None):
        """The space's sampler, seeded with `seed` (a run's; default the space's)."""
        import optuna

        seed = self.seed if seed is None else seed
        if self.sampler == "tpe":
            return optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=min(10, max(2, self.num_samples // 4)), constant_liar=True
            )
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.sampler == "grid":  # the space's own seed: the grid's points are numbered after a seeded shuffle,
            # and an extend's sampler must number them as the sweep's did to know which were visited
            return optuna.samplers.GridSampler(self.grid(), seed=self.seed)
        if self.sampler == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed)
        if self.sampler == "nsga2":  # NSGA-II (Deb et al. 2002); generations of a quarter of the study
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, min(50, self.num_samples // 4)))
        return optuna.samplers.QMCSampler(seed=seed)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "metric": self.metric,
            "mode": self.mode,
            "metrics": list(self.metrics),
            "modes": list(self.modes),
            "sampler": self.sampler,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "max_epochs": self.max_epochs,
            "early_stopping": self.early_stopping,
            "keep_checkpoints": self.keep_checkpoints,
            "warm_start": self.warm_start,
            "resources": self.resources,
            "data": self.data,
            "fixed": self.fixed,
            "space": {k: p.to_dict() for k, p in self.space.items()},
        }


METRICS = ("val_acc", "val_loss", "train_acc", "train_loss", "best_val_acc")
OBJECTIVES = (*METRICS, *COST_METRICS)


def parse_objectives(metric: Any, mode: Any, err) -> tuple[list[str], list[str]]:
    """metric / mode: one name each, or lists of equal length (a multi-objective study)."""
    metrics = metric if isinstance(metric, list) else [metric]
    if not metrics or not all(isinstance(m, str) for m in metrics):
        raise err(f"metric must be a metric name or a list of them, got {metric!r}")
    bad = [m for m in metrics if m not in OBJECTIVES]
    if bad:
        raise err(f"metric={bad[0]!r}: must be one of {', '.join(OBJECTIVES)}")
    if metrics[0] not in METRICS:
        raise err(
            f"metric: the first objective drives early stopping and picks the final stage's trial, so it must be "
            f"a training metric ({', '.join(METRICS)}), not {metrics[0]}; list the cost after it"
        )
    if len(set(metrics)) != len(metrics):
        raise err(f"metric lists {metrics}: each objective once")
    if not isinstance(mode, list) and len(metrics) > 1:
        raise err(f"metric is a list of {len(metrics)} objectives: mode must be a list of as many (max or min)")
    modes = mode if isinstance(mode, list) else [mode]
    if len(modes) != len(metrics):
        raise err(f"metric has {len(metrics)} objective(s) but mode has {len(modes)}: give one mode per metric")
    if not all(m in ("max", "min") for m in modes):
        raise err(f"mode={mode!r}: must be max or min" + (" (one per metric)" if isinstance(mode, list) else ""))
    return list(metrics), list(modes)


def objectives(spec: dict) -> list[tuple[str, str]]:
    """[(metric, mode)] of a recorded spec (StudySpec.to_dict()); one pair for a single-objective study."""
    return list(zip(spec.get("metrics", [spec["metric"]]), spec.get("modes", [spec["mode"]]), strict=True))


def train_keys(params: dict, renames: dict[str, str]) -> dict:
    """A trial's parameters (Optuna's names) as training keys."""
    return {renames.get(k, k): v for k, v in params.items()}
