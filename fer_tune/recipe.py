"""The final stage's recipe for one seed, without Ray: the paper's train -> fine-tune -> evaluate.

1. train from scratch with the study's configuration (test accuracy tracked every `eval_every` epochs, never used
   for selection);
2. fine-tune from the best-validation weights (Khaireddin & Chen 2021: cosine from lr 1e-4 on train + val);
3. measure the last, best-validation and fine-tuned models on the test split with TenCrop, write their confusion
   matrices and saliency maps, and export the fine-tuned model (fer_tune.export).

`run_seed` reads top to bottom; whatever runs it (fer_tune.tune.final.driver on Ray) persists a `SeedState` through
the `save` callback at every epoch and hands the last one back to continue after a crash.
"""

from __future__ import annotations

import csv
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import EMOTIONS, FerTuneError, code_revision, write_json
from .config import TrainConfig

if TYPE_CHECKING:
    import numpy as np

MODELS = ("last", "best_val", "finetuned")
TEST_CROPS = "ten"  # the test split is measured with TenCrop, as the paper (the tracked curve too)
TEST_LOGITS = "test_logits.npy"  # an ensemble member's fine-tuned test logits per crop, float32 (N, crops, 7)
# a baseline keeps the study's model, its size and input, the data and the run settings, and takes every other key
# from the recipe
BASELINE_KEEPS = (
    "model",
    "width",
    "weights",
    "train_crops",
    "test_crops",
    "epochs",
    "protocol",
    "seed",
    "amp",
    "threads",
    "eval_batch_size",
)
BASELINES = ("paper",)
# the final stage's settings (`fer-tune final` options) by default: the paper's 300 epochs, then its fine-tune
# (cosine from lr 1e-4 on train + val, 50 epochs)
FINAL_DEFAULTS = {
    "epochs": 300,
    "finetune_epochs": 50,
    "finetune_lr": 1e-4,
    "finetune_scheduler": "cosine",
    "finetune_on": "train+val",
    "seeds": 1,
    "eval_every": 25,
    "baseline": None,
    "from_pbt": False,  # retrain the PBT stage's best member with its schedule (fer_tune.tune.pbt.driver)
    "ensemble": 1,  # retrain the study's K best distinct configurations and ensemble them (fer_tune.tune.final)
}


def baseline_config(config: dict, name: str) -> dict:
    """The `name` recipe (paper: TrainConfig's defaults, the recipe of Khaireddin & Chen 2021 and usef-kh/fer:
    SGD-Nesterov lr 0.01 momentum 0.9, RLRP factor 0.75 patience 5, dropout 0.2, weight decay 1e-4, batch 64, the
    paper's augmentation) on the winner's model, width, crops and data."""
    return TrainConfig.from_dict(
        {k: config[k] for k in BASELINE_KEEPS if k in config}, source=f"baseline {name}"
    ).to_dict()


class ArraySplits:
    """Splits held as {split: (images uint8 (N, 48, 48), labels)} (e.g. read-only from Ray's object store)."""

    def __init__(self, arrays: dict):
        self._arrays = arrays

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return self._arrays[split]


class FinetuneSplits(ArraySplits):
    """Fine-tuning data: train (+ val, as the paper) to learn from; val still reported."""

    def __init__(self, arrays: dict, on: str):
        super().__init__(arrays)
        self._on = on

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split == "train" and self._on == "train+val":
            import numpy as np

            (xt, yt), (xv, yv) = self._arrays["train"], self._arrays["val"]
            return np.concatenate([xt, xv]), np.concatenate([yt, yv])
        return self._arrays[split]


@dataclass
class SeedState:
    """Where one seed's run is: its phase (train -> finetune -> done), the histories so far, the train phase's
    best epoch, its best-val and last-epoch weights, and fit()'s checkpoint of the running phase."""

    seed: int
    arm: str
    phase: str = "train"
    status: str = "complete"  # "diverged" when a phase's loss went NaN / inf
    train_history: list = field(default_factory=list)
    finetune_history: list = field(default_factory=list)
    best: dict | None = None  # {"epoch", "val_acc"} of the train phase
    weights: dict = field(default_factory=lambda: {"best": None, "last": None})  # state_dicts
    fit_state: dict | None = None

    def progress(self) -> dict:
        """The JSON part (progress.json); weights and fit_state are tensor files beside it."""
        return {
            "phase": self.phase,
            "seed": self.seed,
            "arm": self.arm,
            "status": self.status,
            "train_history": self.train_history,
            "finetune_history": self.finetune_history,
            "best": self.best,
        }

    @classmethod
    def restore(cls, progress: dict, weights: dict, fit_state: dict | None) -> SeedState:
        s = cls(
            seed=progress["seed"],
            arm=progress["arm"],
            phase=progress["phase"],
            status=progress.get("status", "complete"),
            train_history=progress.get("train_history", []),
            finetune_history=progress.get("finetune_history", []),
            best=progress.get("best"),
            fit_state=fit_state,
        )
        s.weights.update(weights)
        return s

    def epochs_done(self) -> int:
        return len(self.train_history) + len(self.finetune_history)


# save(state, epoch metrics, step=epochs into the run (None: none, the run diverged), pinned=keep this checkpoint,
# outputs=the evaluated run's files (the last save))
Save = Callable[..., None]


def run_seed(
    cfg: TrainConfig,
    finetune: dict,
    data: dict,
    state: SeedState,
    *,
    save: Save,
    device: Any,
    eval_every: int,
    track_crops: str | None = None,
    export: bool = True,
    provenance: dict | None = None,
    schedule: dict | None = None,
    keep_logits: bool = False,
) -> dict | None:
    """Run (or continue) one seed; returns its test metrics (metrics.json), None when it diverged or was done.
    `schedule`: the training phase's changes per epoch (fer_tune.schedule: a PBT member's, replayed);
    `keep_logits`: the fine-tuned model's test logits per crop kept (TEST_LOGITS: an ensemble's member)."""
    from .observers import TrackedTest
    from .train import fit

    if state.phase == "done":
        return None
    ft_cfg = cfg.replace(epochs=finetune["epochs"], lr=finetune["lr"], scheduler=finetune["scheduler"])
    test = data["test"]

    def diverged(metrics: dict) -> bool:
        state.status = "diverged"
        save(state, {**metrics, "val_acc": 0.0}, step=None, pinned=False)
        return False

    # 1. train from scratch
    if state.phase == "train":

        def on_train_epoch(m: dict, take: Any) -> bool | None:
            if take is None:
                return diverged(m)
            st = take()
            if m["is_best"]:
                state.weights["best"] = st["model"]
            state.train_history, state.fit_state = st["history"], st
            state.best = {"epoch": m["best_epoch"], "val_acc": m["best_val_acc"]}
            e = m["epoch"]
            save(state, m, step=e, pinned=e % eval_every == 0 or e == cfg.epochs)
            return None

        res = fit(
            cfg,
            ArraySplits(data),
            device=device,
            checkpoint=state.fit_state,
            on_epoch=on_train_epoch,
            schedule=schedule,
            observers=[TrackedTest(*test, every=eval_every, crops=track_crops)],
        )
        if res.status == "diverged":
            return None
        state.weights["last"] = res.checkpoint["model"]
        state.train_history = state.train_history or res.history
        state.best = state.best or {"epoch": res.best["epoch"], "val_acc": res.best["val_acc"]}
        state.phase, state.fit_state = "finetune", None

    # 2. fine-tune from the best-val weights
    def on_ft_epoch(m: dict, take: Any) -> bool | None:
        if take is None:
            return diverged(m)
        st = take()
        state.finetune_history, state.fit_state = st["history"], st
        save(state, m, step=cfg.epochs + m["epoch"], pinned=False)
        return None

    res = fit(
        ft_cfg,
        FinetuneSplits(data, finetune["on"]),
        device=device,
        checkpoint=state.fit_state,
        init_model=state.weights["best"],
        on_epoch=on_ft_epoch,
        observers=[TrackedTest(*test, every=eval_every, crops=track_crops)],
    )
    if res.status == "diverged":
        return None
    state.finetune_history = state.finetune_history or res.history

    # 3. evaluate the three models on the test split; export the fine-tuned one
    with tempfile.TemporaryDirectory() as d:
        out_dir = Path(d) / "outputs"
        result = evaluate_and_export(
            cfg,
            ft_cfg,
            {**state.weights, "finetuned": res.checkpoint["model"]},
            data,
            device,
            out_dir,
            state,
            export=export,
            provenance=provenance,
            keep_logits=keep_logits,
        )
        state.phase, state.fit_state = "done", None
        state.weights.update(best=None, last=None)  # the exports hold them now
        save(
            state,
            {
                "epoch": ft_cfg.epochs,
                "val_acc": result["best_val_acc"],
                "test_acc": result["models"]["finetuned"]["top1"],
                "status": "done",
            },
            step=None,
            pinned=True,
            outputs=out_dir,
        )
    return result


def evaluate_and_export(
    cfg: TrainConfig,
    ft_cfg: TrainConfig,
    weights: dict,
    data: dict,
    device: Any,
    out_dir: Path,
    state: SeedState,
    *,
    export: bool = True,
    provenance: dict | None = None,
    keep_logits: bool = False,
) -> dict:
    """Test metrics of the models `weights` holds (last, best, finetuned: the final stage's three; the PBT stage's
    best member: last alone), confusion CSVs, saliency maps; with `export`, the files of the last of them (a
    baseline's models are measured, not exported); with `keep_logits`, its test logits per crop (TEST_LOGITS)."""
    from .device import precision, precision_name
    from .evaluate import evaluate_model, saliency_sample
    from .train import model_from_checkpoint

    out_dir.mkdir(parents=True)
    x_test, y_test = data["test"]
    models = {}
    key = {"last": "last", "best_val": "best", "finetuned": "finetuned"}
    names = [n for n in MODELS if weights.get(key[n]) is not None]
    for name in names:
        model, _ = model_from_checkpoint({"config": cfg.to_dict(), "model": weights[key[name]]}, device)
        models[name] = evaluate_model(
            model,
            x_test,
            y_test,
            device=device,
            crops=TEST_CROPS,
            batch_size=cfg.eval_batch_size,
            amp=cfg.amp,
            save_logits=out_dir / TEST_LOGITS if keep_logits and name == names[-1] else None,
        )
        write_confusion(out_dir / f"confusion_{name}.csv", models[name]["confusion"])
    saliency_sample(model, x_test, y_test, out_dir, device=device, seed=cfg.seed)
    if export:
        from .export import export_model

        export_model(
            model, ft_cfg, cfg, weights[key[name]], models[name], out_dir, provenance or {}, x_test[:64], TEST_CROPS
        )
    result = {
        "seed": cfg.seed,
        "status": state.status,
        "precision": precision_name(precision(device, cfg.amp)[0]),
        "best_epoch": state.best["epoch"],
        "best_val_acc": state.best["val_acc"],
        "history": state.train_history,
        "finetune_history": state.finetune_history,
        "models": models,
        "code": code_revision(),
    }
    write_json(out_dir / "metrics.json", result)
    return result


def write_confusion(path: Path, confusion: list[list[int]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["true \\ predicted", *EMOTIONS])
        for e, row in zip(EMOTIONS, confusion):
            w.writerow([e, *row])


# ---------------------------------------------------------------------------------------------------------
# over seeds
# ---------------------------------------------------------------------------------------------------------
def aggregate(runs: list[dict]) -> dict:
    """{model: {metric: mean/std/values}} over the completed runs."""
    if not runs:
        return {}
    return {
        name: {k: mean_std([s["models"][name][k] for s in runs]) for k in ("top1", "top2", "macro_f1")}
        for name in MODELS
    }


def mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def pm(agg: dict, digits: int = 2, sign: str = "+-") -> str:
    """'mean +- std' over the seeds; the mean alone with one seed (a spread needs two)."""
    if len(agg["values"]) < 2:
        return f"{agg['mean']:.{digits}f}"
    return f"{agg['mean']:.{digits}f} {sign} {agg['std']:.{digits}f}"


def check_final_options(given: dict, *, trial: int | None, gpus: float | None, cpus: float | None) -> None:
    """FerTuneError for `fer-tune final` options that cannot go together or take no such value (before any stage
    is read: `fer-tune slurm --final` checks them when it writes the job)."""
    if given.get("from_pbt") and trial is not None:
        raise FerTuneError("--from-pbt retrains the PBT stage's best member and --trial N a study trial: give one")
    if (given.get("ensemble") or 1) > 1 and trial is not None:
        raise FerTuneError(
            f"--ensemble {given['ensemble']} retrains the study's {given['ensemble']} best configurations and "
            "--trial N one trial: give one"
        )
    for k, v in given.items():
        if v is not None and k not in ("finetune_scheduler", "finetune_on", "baseline", "from_pbt") and v <= 0:
            raise FerTuneError(f"--{k.replace('_', '-')} must be > 0, got {v}")
    if given.get("baseline") not in (None, *BASELINES):
        raise FerTuneError(f"--baseline {given['baseline']}: the baselines are {', '.join(BASELINES)}")
    if gpus is not None and gpus < 0:
        raise FerTuneError(f"--gpus-per-run must be >= 0, got {gpus}")
    if cpus is not None and cpus <= 0:
        raise FerTuneError(f"--cpus-per-run must be > 0, got {cpus}")
