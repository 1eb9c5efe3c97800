"""The final stage: a study's best configuration retrained from scratch, fine-tuned as the paper does, evaluated
with TenCrop on the test split; K seeds in parallel on Ray, resumable like a study.

results/NAME/final/
    final.json    what was launched: the trial, its config, the fine-tune settings, the seeds
    tune/         Ray's experiment, one trial per seed; checkpoints: the latest, one every --eval-every epochs
                  and the finished one (each holds state.pt, best.pt = the best-val weights, progress.json)
    seed-S/       per seed: metrics.json, confusion_{last,best_val,finetuned}.csv, saliency.png/.npz,
                  model.pt (state_dict + config), model.pt2 (torch.export program), model.json
    metrics.json  per seed and mean +- std over seeds (written when every seed has finished)
    history.csv   every seed's train and fine-tune epochs (also while running or after an interruption)
    model.pt, model.pt2, model.json   the fine-tuned model of the seed with the best validation accuracy

Each seed runs fer_tune.train.fit twice (train, then fine-tune from the best-val weights); the trainable below
is the Ray adapter: per-epoch `tune.report` with a checkpoint, and `tune.get_checkpoint` to continue.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import EMOTIONS, NAME_RULE, FerTuneError, is_plain_name, write_json
from .lock import acquire

FINAL_FILE = "final.json"
MODELS = ("last", "best_val", "finetuned")
TEST_CROPS = "ten"  # the test split is measured with TenCrop, as the paper (the tracked curve too)
WINNER = "winner"  # the arm of the study's trial; a baseline's arm is its name
SNAPSHOT_KEEP = 1e6  # a checkpoint's `keep` from here on: an --eval-every snapshot or the finished run (kept)
HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc", "lr", "epoch_seconds")
DEFAULTS = {"epochs": 300, "finetune_epochs": 50, "finetune_lr": 1e-4, "finetune_scheduler": "cosine",
            "finetune_on": "train+val", "seeds": 1, "eval_every": 25, "baseline": None}
BASELINES = ("paper",)
# the paper's recipe (Khaireddin & Chen 2021, usef-kh/fer): TrainConfig's defaults; a baseline keeps the study's
# model, its size and input, the data and the run settings, and takes every other key from the recipe
BASELINE_KEEPS = ("model", "width", "weights", "train_crops", "test_crops", "epochs", "protocol", "seed", "amp",
                  "threads", "eval_batch_size")


def baseline_config(config: dict, name: str) -> dict:
    """The `name` recipe (paper: SGD-Nesterov lr 0.01 momentum 0.9, RLRP factor 0.75 patience 5, dropout 0.2,
    weight decay 1e-4, batch 64, the paper's augmentation) on the winner's model, width, crops and data."""
    from .config import TrainConfig

    return TrainConfig.from_dict({k: config[k] for k in BASELINE_KEEPS if k in config},
                                 source=f"baseline {name}").to_dict()


class _FinetuneSplits:
    """Fine-tuning data: train (+ val, as the paper) to learn from; val still reported."""

    def __init__(self, arrays: dict, on: str):
        self._arrays = arrays
        self._on = on

    def arrays(self, split: str):
        if split == "train" and self._on == "train+val":
            (xt, yt), (xv, yv) = self._arrays["train"], self._arrays["val"]
            return np.concatenate([xt, xv]), np.concatenate([yt, yv])
        return self._arrays[split]


# ---------------------------------------------------------------------------------------------------------
# one seed, inside Ray Tune
# ---------------------------------------------------------------------------------------------------------
def _final_trial(config: dict, *, base: dict, finetune: dict, data: dict, eval_every: int, weight: float,
                 arms: dict | None = None, track_crops: str | None = None) -> None:
    from ray import tune

    from .checkpoints import restore, write_meta
    from .config import TrainConfig
    from .models import load_tensor_file
    from .study import _memory_mb, _Splits
    from .train import fit, save_checkpoint, select_device

    seed = int(config["seed"])
    arm = config.get("arm", WINNER)
    cfg = TrainConfig.from_dict({**(base if arm == WINNER else (arms or {})[arm]), "seed": seed},
                                source="final config")
    ft_cfg = cfg.replace(epochs=finetune["epochs"], lr=finetune["lr"], scheduler=finetune["scheduler"])
    device = select_device()
    progress: dict[str, Any] = {"phase": "train", "seed": seed, "arm": arm}
    state = None
    weights: dict[str, Any] = {"best": None, "last": None}  # best-val and last-epoch weights of the train phase

    def load(d: Path):
        files = {k: load_tensor_file(d / f"{k}.pt", "checkpoint")["model"] for k in weights if (d / f"{k}.pt").exists()}
        st = load_tensor_file(d / "state.pt", "checkpoint") if (d / "state.pt").exists() else None
        return json.loads((d / "progress.json").read_text()), st, files

    ckpt = tune.get_checkpoint()
    restored = restore(ckpt, load, order=progress_order) if ckpt is not None else None
    if restored is not None:
        progress, state, files = restored
        weights.update(files)
    if progress["phase"] == "done":
        return
    resumed_at = len(progress.get("train_history", [])) + len(progress.get("finetune_history", []))
    test = data["test"]

    def report(metrics: dict, st: dict | None, keep: float, outputs: Path | None = None) -> None:
        out = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        out.update(seed=seed, arm=arm, phase=progress["phase"], keep=keep, device=str(device), resumed_at=resumed_at,
                   **_memory_mb())
        out["device_seconds"] = weight * sum(h["epoch_seconds"] for h in
                                             progress.get("train_history", []) + progress.get("finetune_history", []))
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            (d / "progress.json").write_text(json.dumps(progress))
            if st is not None:
                save_checkpoint(st, d / "state.pt")
            for k, sd in weights.items():
                if sd is not None:
                    save_checkpoint({"model": sd}, d / f"{k}.pt")
            if outputs is not None:
                shutil.copytree(outputs, d / "outputs")
            write_meta(d, out)
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(d))

    def diverged(metrics: dict) -> bool:
        progress["status"] = "diverged"
        report({**metrics, "val_acc": 0.0}, None, keep=-1.0)
        return False

    # 1. train from scratch; test accuracy tracked every eval_every epochs (never used for selection)
    if progress["phase"] == "train":
        def on_train_epoch(m: dict, st: dict | None):
            if st is None:
                return diverged(m)
            if m["is_best"]:
                weights["best"] = st["model"]
            progress["train_history"] = st["history"]
            progress["best"] = {"epoch": m["best_epoch"], "val_acc": m["best_val_acc"]}
            e = m["epoch"]
            snapshot = e % eval_every == 0 or e == cfg.epochs
            report(m, st, keep=SNAPSHOT_KEEP + e if snapshot else float(e))
            return None

        res = fit(cfg, _Splits(data), device=device, checkpoint=state, on_epoch=on_train_epoch,
                  track=test, track_every=eval_every, track_crops=track_crops)
        if res.status == "diverged":
            return
        weights["last"] = res.checkpoint["model"]
        progress.setdefault("train_history", res.history)
        progress.setdefault("best", {"epoch": res.best["epoch"], "val_acc": res.best["val_acc"]})
        progress["phase"], state = "finetune", None

    # 2. fine-tune from the best-val weights (the paper: cosine from 1e-4 on train + val)
    if progress["phase"] == "finetune":
        def on_ft_epoch(m: dict, st: dict | None):
            if st is None:
                return diverged(m)
            progress["finetune_history"] = st["history"]
            report(m, st, keep=float(cfg.epochs + m["epoch"]))
            return None

        res = fit(ft_cfg, _FinetuneSplits(data, finetune["on"]), device=device, checkpoint=state,
                  init_model=weights["best"], on_epoch=on_ft_epoch, track=test, track_every=eval_every,
                  track_crops=track_crops)
        if res.status == "diverged":
            return
        progress.setdefault("finetune_history", res.history)
        finetuned = res.checkpoint["model"]

    # 3. evaluate last, best-val and fine-tuned on the test split with TenCrop; export the fine-tuned model
    progress["phase"] = "evaluate"
    with tempfile.TemporaryDirectory() as d:
        out_dir = Path(d) / "outputs"
        result = _evaluate_and_export(cfg, ft_cfg, {**weights, "finetuned": finetuned}, data, device, out_dir,
                                      progress, export=arm == WINNER)
        progress["phase"] = "done"
        weights.update(best=None, last=None)  # the exports hold them now
        report({"epoch": ft_cfg.epochs, "val_acc": result["best_val_acc"], "test_acc": result["models"]["finetuned"]
                ["top1"], "status": "done"}, None, keep=2 * SNAPSHOT_KEEP, outputs=out_dir)


def progress_order(meta: dict) -> float:
    """How far a final-stage checkpoint got (its `keep` without the snapshot mark; the finished run last)."""
    keep = float(meta.get("keep", -1))
    return keep - SNAPSHOT_KEEP if SNAPSHOT_KEEP <= keep < 2 * SNAPSHOT_KEEP else keep


def _evaluate_and_export(cfg, ft_cfg, weights: dict, data: dict, device, out_dir: Path, progress: dict, *,
                         export: bool = True) -> dict:
    """Test metrics of the three models, confusion CSVs, saliency maps; with `export`, the fine-tuned model's
    files (a baseline's models are measured, not exported)."""
    from .evaluate import evaluate_model, saliency_sample
    from .train import model_from_checkpoint, precision, precision_name

    out_dir.mkdir(parents=True)
    x_test, y_test = data["test"]
    models = {}
    key = {"last": "last", "best_val": "best", "finetuned": "finetuned"}
    for name in MODELS:
        model, _ = model_from_checkpoint({"config": cfg.to_dict(), "model": weights[key[name]]}, device)
        models[name] = evaluate_model(model, x_test, y_test, device=device, crops=TEST_CROPS,
                                      batch_size=cfg.eval_batch_size, amp=cfg.amp)
        _write_confusion(out_dir / f"confusion_{name}.csv", models[name]["confusion"])
    saliency_sample(model, x_test, y_test, out_dir, device=device, seed=cfg.seed)
    if export:
        _export(model, ft_cfg, cfg, weights["finetuned"], models, out_dir)
    result = {"seed": cfg.seed, "status": progress.get("status", "complete"),
              "precision": precision_name(precision(device, cfg.amp)[0]), "best_epoch": progress["best"]["epoch"],
              "best_val_acc": progress["best"]["val_acc"],
              "history": progress["train_history"], "finetune_history": progress["finetune_history"],
              "models": models}
    write_json(out_dir / "metrics.json", result)
    return result


def _export(model, ft_cfg, cfg, finetuned: dict, models: dict, out_dir: Path) -> None:
    from .train import save_checkpoint

    export = {"format": 1, "kind": "fer-tune model", "config": ft_cfg.to_dict(), "model": finetuned,
              "classes": list(EMOTIONS)}
    save_checkpoint(export, out_dir / "model.pt")
    _export_program(model, out_dir / "model.pt2")
    write_json(out_dir / "model.json", {
        "classes": list(EMOTIONS),
        "preprocessing": {"grayscale": True, "resize": [48, 48], "scale": "pixel / 255", "crops": "TenCrop(40)",
                          "combine": "mean of the 10 crops' logits, then softmax"},
        "input": "float32 (N, 1, 40, 40) crops in [0, 1]", "output": "logits (N, 7) in the order of classes",
        "config": ft_cfg.to_dict(), "seed": cfg.seed,
        "test_top1": models["finetuned"]["top1"], "protocol": cfg.protocol,
        "files": {"model.pt": "fer-tune checkpoint (fer-tune predict / evaluate)",
                  "model.pt2": "torch.export program: torch.export.load(path).module()(crops)"},
    })


def _export_program(model, path: Path) -> None:
    import torch

    model = model.float().cpu().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.zeros(2, 1, 40, 40),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def _write_confusion(path: Path, confusion: list[list[int]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["true \\ predicted", *EMOTIONS])
        for e, row in zip(EMOTIONS, confusion):
            w.writerow([e, *row])


# ---------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------
def best_trial(sdir: Path, record: dict, spec, number: int | None) -> dict:
    """The study's best finished trial by its metric and mode (or trial `number`), with its full config."""
    import optuna

    from .trials import trials_table

    rows = trials_table(sdir, record)
    key = f"best_{spec.metric}"
    if number is not None:
        row = next((r for r in rows if r["number"] == number), None)
        if row is None:
            raise FerTuneError(f"{sdir}: the study has no trial {number} (trials 0..{len(rows) - 1})")
        if row[key] == "":
            raise FerTuneError(f"{sdir}: trial {number} reported no {spec.metric} ({row['status']}); pick another")
    else:
        scored = [r for r in rows if r[key] != "" and r["state"] != "FAIL"]
        if not scored:
            raise FerTuneError(f"{sdir}: the study has no finished trial with a {spec.metric} yet "
                               f"({len(rows)} trials); run or resume the sweep first")
        row = (max if spec.mode == "max" else min)(scored, key=lambda r: float(r[key]))
    study = optuna.load_study(study_name=record["optuna_study"], storage=_storage(record))
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == row["number"])
    constants = spec.define_by_run()(optuna.trial.FixedTrial(trial.params)) or {}
    params = {**trial.params, **constants}
    return {"number": row["number"], "ray_trial_id": row["ray_trial_id"], "metric": spec.metric,
            "value": float(row[key]), "epoch": row["best_epoch"], "params": params,
            "config": spec.trial_config(params).to_dict()}


def _storage(record: dict):
    from .study import resolve_storage

    return resolve_storage(record["storage"])


def _settings(out: Path, given: dict) -> dict | None:
    """The recorded settings of an existing final stage; refuses when given options contradict them."""
    f = out / FINAL_FILE
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise FerTuneError(f"{f} is damaged ({exc}); remove {out} to start the final stage again") from None
    def recorded(k: str) -> str:
        if rec["settings"].get(k) is not None:
            return f"recorded: {rec['settings'][k]}"
        if k == "trial":
            return f"it retrains trial {rec['trial']['number']}, the study's best"
        return "it was started without it"

    conflicts = [f"--{k.replace('_', '-')} {v} ({recorded(k)})" for k, v in given.items()
                 if v is not None and rec["settings"].get(k) != v]
    if conflicts:
        raise FerTuneError(f"{out} already holds a final stage with other settings: {', '.join(conflicts)}. Run it "
                           "again without these options to continue it, or pass --out DIR for a new one.")
    return rec


def run_final(study: str, *, trial: int | None, out: str | None, given: dict, gpus: float | None,
              cpus: float | None = None,
              address: str | None, quiet: bool, loader, num_cpus: int | None = None, force: bool = False) -> int:
    """`fer-tune final`: start, continue or report a study's final stage (holding the lock of its directory).
    ``given``: the options the user passed (None = not given) among DEFAULTS' keys."""
    sdir = Path(study).resolve()
    out_p = Path(out).resolve() if out else sdir / "final"
    for k, v in given.items():
        if v is not None and k not in ("finetune_scheduler", "finetune_on", "baseline") and v <= 0:
            raise FerTuneError(f"--{k.replace('_', '-')} must be > 0, got {v}")
    if given.get("baseline") not in (None, *BASELINES):
        raise FerTuneError(f"--baseline {given['baseline']}: the baselines are {', '.join(BASELINES)}")
    if gpus is not None and gpus < 0:
        raise FerTuneError(f"--gpus-per-run must be >= 0, got {gpus}")
    if cpus is not None and cpus <= 0:
        raise FerTuneError(f"--cpus-per-run must be > 0, got {cpus}")
    from .study import read_study

    record = read_study(sdir)
    _check_out(out_p, sdir, record)
    with acquire(out_p, what="the final stage", force=force, create=True):
        return _final(sdir, out_p, trial=trial, given=given, gpus=gpus, cpus=cpus, address=address, quiet=quiet,
                      loader=loader, num_cpus=num_cpus, force=force)


def _check_out(out: Path, sdir: Path, record: dict) -> None:
    """A final stage's directory: not the study's own, nor inside one of its Ray experiments; its name is a plain
    name (it names the final stage's Ray experiment beside the study's in a shared Ray storage)."""
    runs = {r["dir"] for r in record["runs"]}
    inside = out.is_relative_to(sdir) and out != sdir and out.relative_to(sdir).parts[0] in runs
    if out == sdir or sdir.is_relative_to(out) or inside:
        raise FerTuneError(f"--out {out}: a final stage needs a directory of its own, not the study directory or "
                           f"one of its Ray experiments ({', '.join(sorted(runs))}); the default is {sdir / 'final'}")
    if not is_plain_name(out.name):
        raise FerTuneError(f"--out {out}: the directory's name {out.name!r} names the final stage's Ray "
                           f"experiment: {NAME_RULE}")
    if record.get("ray_storage") and out.name in runs:
        raise FerTuneError(f"--out {out}: its name {out.name!r} is taken by the study's own Ray experiment in "
                           f"{record['ray_storage']}; choose another directory name")


def _final(sdir: Path, out_p: Path, *, trial: int | None, given: dict, gpus: float | None, cpus: float | None,
           address: str | None, quiet: bool, loader, num_cpus: int | None, force: bool) -> int:
    from .lock import describe, holder
    from .storage import join, study_storage
    from .study import _reopen

    record, spec, data = _reopen(sdir, force, loader)
    rec = _settings(out_p, {**given, "trial": trial})
    running = holder(sdir) if rec is None and trial is None else None
    if running:
        raise FerTuneError(f"{sdir}: the study is being run by {describe(running)}, so its best trial is not "
                           "settled yet: start the final stage when it has finished, or pick a trial with --trial N")
    new = False
    if rec is None:
        settings = {k: (given.get(k) if given.get(k) is not None else v) for k, v in DEFAULTS.items()}
        settings["trial"] = trial
        settings["eval_every"] = min(settings["eval_every"], settings["epochs"])
        best = best_trial(sdir, record, spec, trial)
        config = {**best["config"], "epochs": settings["epochs"]}
        seeds = [int(config["seed"]) + i for i in range(settings["seeds"])]
        res = spec.resources
        rec = {"study": record["name"], "study_dir": str(sdir), "trial": {k: best[k] for k in
               ("number", "ray_trial_id", "metric", "value", "epoch", "params")},
               "config": config, "settings": settings,
               "finetune": {"epochs": settings["finetune_epochs"], "lr": settings["finetune_lr"],
                            "scheduler": settings["finetune_scheduler"], "on": settings["finetune_on"]},
               "seeds": seeds, "eval_every": settings["eval_every"], "protocol": data.protocol,
               "protocol_note": data.protocol_note,
               "resources": {"cpu": res["cpu"] if cpus is None else cpus, "gpu": res["gpu"] if gpus is None else gpus},
               # Ray's experiment: beside the study's own (its --storage on a cluster), else in OUT
               "ray_storage": join(study_storage(sdir, record), out_p.name) if record.get("ray_storage")
               else str(out_p),
               "created": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_seconds": 0.0, "track_crops": TEST_CROPS}
        if settings["baseline"]:
            rec["baselines"] = {settings["baseline"]: baseline_config(config, settings["baseline"])}
        from .config import TrainConfig

        TrainConfig.from_dict({**config, "epochs": settings["finetune_epochs"], "lr": settings["finetune_lr"],
                               "scheduler": settings["finetune_scheduler"]}, source="fine-tune settings")
        new = True
        print(f"final stage of {record['name']}: trial {best['number']} ({spec.metric} {best['value']:.2f}) "
              f"with {best['params']}; {settings['epochs']} epochs + {settings['finetune_epochs']} fine-tune epochs "
              f"({settings['finetune_scheduler']} from lr {settings['finetune_lr']:g} on {settings['finetune_on']}), "
              f"seeds {seeds}"
              + (f"; beside it the {settings['baseline']} recipe with the same epochs, fine-tune and seeds"
                 if settings["baseline"] else "") + f"; results in {out_p}", flush=True)
    elif any(v is not None and v != rec["resources"][k] for k, v in (("cpu", cpus), ("gpu", gpus))):
        raise FerTuneError(f"{out_p} already holds a final stage that runs with {rec['resources']['cpu']:g} CPU and "
                           f"{rec['resources']['gpu']:g} GPU per run; it keeps them. Run it again without "
                           "--cpus-per-run / --gpus-per-run, or pass --out DIR for a new one.")
    elif (out_p / "metrics.json").exists():
        print(f"{out_p}: the final stage is complete")
        _print_final(json.loads((out_p / "metrics.json").read_text()), out_p)
        return 0
    else:
        print(f"continuing the final stage in {out_p} from its last checkpoints", flush=True)
    return _run_final(out_p, rec, data, address=address, quiet=quiet, num_cpus=num_cpus, new=new)


_FINAL_FIX = ("start the final stage with --cpus-per-run N and --gpus-per-run F that fit it (--gpus-per-run 0 on a "
              "machine without a GPU), or run it on a Ray cluster with --address")
_CONTINUE_FIX = ("the final stage was started with these resources per run: continue it on a Ray cluster that has "
                 "them (--address), or here with --num-cpus N to let Ray count more CPUs than it found; or start a "
                 "new one with --out DIR and --cpus-per-run / --gpus-per-run")


def _run_final(out: Path, rec: dict, data, *, address: str | None, quiet: bool, num_cpus: int | None,
               new: bool = False) -> int:
    from . import signals, storage
    from .checkpoints import pruner
    from .study import _start, _stop

    started = _start(address, quiet, num_cpus, rec["ray_storage"], rec["resources"],
                     _FINAL_FIX if new else _CONTINUE_FIX, what="run")
    from ray import tune

    try:
        if new:  # written once Ray has accepted the runs: a refused stage leaves nothing behind
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / FINAL_FILE, rec)
        res = rec["resources"]
        weight = res["gpu"] if res["gpu"] else res["cpu"]
        threads = max(1, int(res["cpu"]))
        base = {**rec["config"], "threads": rec["config"].get("threads") or threads}
        arms = {name: {**c, "threads": c.get("threads") or threads} for name, c in rec.get("baselines", {}).items()}
        arrays = {s: data.arrays(s) for s in ("train", "val", "test")}
        trainable = tune.with_resources(
            tune.with_parameters(_final_trial, base=base, finetune=rec["finetune"], data=arrays,
                                 eval_every=rec["eval_every"], weight=weight, arms=arms,
                                 track_crops=rec.get("track_crops")),
            resources={"cpu": res["cpu"], "gpu": res["gpu"]})
        exp = storage.join(rec["ray_storage"], "tune")
        if storage.exists(storage.join(exp, "tuner.pkl")):
            tuner = tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space={"seed": tune.grid_search(rec["seeds"]),
                                        **({"arm": tune.grid_search([WINNER, *arms])} if arms else {})},
                tune_config=tune.TuneConfig(reuse_actors=False),
                run_config=tune.RunConfig(
                    name="tune", storage_path=rec["ray_storage"], verbose=0 if quiet else 1,
                    # Tune deletes no checkpoint; kept: the latest 3, the --eval-every snapshots, the finished one
                    callbacks=[pruner(latest=3, pinned=lambda m: m.get("keep", 0) >= SNAPSHOT_KEEP)],
                    failure_config=tune.FailureConfig(max_failures=2)))
        t0 = time.time()
        try:
            grid = tuner.fit()
        except KeyboardInterrupt:
            grid = None
        rec["wall_seconds"] = rec.get("wall_seconds", 0.0) + time.time() - t0
        write_json(out / FINAL_FILE, rec)
        write_history(out, exp)
        done = _collect(out, rec, grid) if grid is not None else None
        if done is None:
            print(f"\nfinal stage interrupted; continue it with:\n    fer-tune final {rec['study_dir']}"
                  + (f" --out {out}" if out != Path(rec["study_dir"]) / "final" else ""), flush=True)
            return signals.exit_code()
        _print_final(done, out)
        return 0 if all(s["status"] == "complete" for s in done["seeds"]) else 1
    finally:
        _stop(started)


def _collect(out: Path, rec: dict, grid) -> dict | None:
    """Per-seed outputs from the finished checkpoints into seed-S/ (a baseline's into baseline-NAME/seed-S/), then
    metrics.json; None if a run is unfinished."""
    arms: dict[str, list[dict]] = {}
    for r in grid:
        m = r.metrics or {}
        cfg = r.config or {}
        seed, arm = int(cfg.get("seed", m.get("seed", -1))), cfg.get("arm", WINNER)
        if m.get("status") == "done" and r.checkpoint is not None:
            dest = out / (f"seed-{seed}" if arm == WINNER else f"baseline-{arm}/seed-{seed}")
            with r.checkpoint.as_directory() as d:
                if dest.exists():
                    shutil.rmtree(dest)
                shutil.copytree(Path(d) / "outputs", dest)
            s = json.loads((dest / "metrics.json").read_text())
        elif m.get("status") == "diverged":
            s = {"seed": seed, "status": "diverged", "message": "training diverged (loss NaN/inf); see history.csv"}
        elif r.error is not None:
            s = {"seed": seed, "status": "error", "message": str(r.error).strip().splitlines()[-1][:500]}
        else:
            return None
        s["device_seconds"] = float(m.get("device_seconds", 0.0))
        arms.setdefault(arm, []).append(s)
    seeds = sorted(arms.pop(WINNER, []), key=lambda s: s["seed"])
    ok = [s for s in seeds if s["status"] == "complete"]
    baselines = {}
    for name, runs in sorted(arms.items()):
        runs.sort(key=lambda s: s["seed"])
        done = [s for s in runs if s["status"] == "complete"]
        baselines[name] = {"name": name, "config": rec["baselines"][name], "seeds": runs, "aggregate": _aggregate(done),
                           "status": "complete" if len(done) == len(runs) else "partial"}
    everything = seeds + [s for b in baselines.values() for s in b["seeds"]]
    metrics = {"study": rec["study"], "protocol": rec["protocol"], "protocol_note": rec["protocol_note"],
               "test_split": "test (" + rec["protocol_note"] + ")", "trial": rec["trial"], "config": rec["config"],
               "finetune": rec["finetune"], "seeds": seeds, "aggregate": _aggregate(ok),
               "device_hours": round(sum(s["device_seconds"] for s in everything) / 3600, 4),
               "wall_seconds": round(rec["wall_seconds"], 1),
               "status": "complete" if all(s["status"] == "complete" for s in everything) else "partial"}
    for name, b in baselines.items():  # the winner's mean minus the baseline's over the seeds both completed
        both = sorted({s["seed"] for s in ok} & {s["seed"] for s in b["seeds"] if s["status"] == "complete"})
        w_agg, b_agg = (_aggregate([s for s in runs if s["seed"] in both]) for runs in (ok, b["seeds"]))
        b["difference_seeds"] = both
        b["difference"] = {n: {k: w_agg[n][k]["mean"] - b_agg[n][k]["mean"] for k in ("top1", "top2", "macro_f1")}
                           for n in MODELS if n in w_agg and n in b_agg}
    if baselines:
        metrics["baseline"] = next(iter(baselines.values()))
    if ok:
        top = max(ok, key=lambda s: s["best_val_acc"])
        for f in ("model.pt", "model.pt2", "model.json"):
            shutil.copy2(out / f"seed-{top['seed']}" / f, out / f)
        metrics["exported_seed"] = top["seed"]
    write_json(out / "metrics.json", metrics)
    return metrics


def _aggregate(runs: list[dict]) -> dict:
    """{model: {metric: mean/std/values}} over the completed runs."""
    if not runs:
        return {}
    return {name: {k: _mean_std([s["models"][name][k] for s in runs]) for k in ("top1", "top2", "macro_f1")}
            for name in MODELS}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def write_history(out: Path, exp: str) -> list[dict]:
    """history.csv from the seeds' Ray results in `exp` (a re-run epoch's later report wins); works on partial
    runs."""
    from . import storage
    from .checkpoints import checkpointed_results, result_rows

    rows: dict[tuple, dict] = {}

    def add(r: dict, replace: bool) -> None:
        if r.get("phase") not in ("train", "finetune") or "epoch" not in r or "train_loss" not in r:
            return
        arm = r.get("arm", WINNER)
        key = (arm != WINNER, arm, r["seed"], r["phase"] != "train", r["epoch"])
        if replace or key not in rows:
            rows[key] = {"seed": r["seed"], "phase": r["phase"], "epoch": r["epoch"],
                         **{k: r.get(k, "") for k in HISTORY_KEYS}, "arm": arm}

    for trial_dir in storage.listdir(exp):
        for r in result_rows(storage.read_text(storage.join(exp, trial_dir, "result.json")) or ""):
            add(r, replace=True)
        # epochs a killed driver did not write to result.json: the copy in each checkpoint
        for r in checkpointed_results(storage.join(exp, trial_dir)):
            add(r, replace=False)
    table = [rows[k] for k in sorted(rows)]
    tmp = out / ".history.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["seed", "phase", "epoch", *HISTORY_KEYS, "arm"])
        w.writeheader()
        w.writerows(table)
    tmp.replace(out / "history.csv")
    return table


def pm(agg: dict, digits: int = 2, sign: str = "+-") -> str:
    """'mean +- std' over the seeds; the mean alone with one seed (a spread needs two)."""
    if len(agg["values"]) < 2:
        return f"{agg['mean']:.{digits}f}"
    return f"{agg['mean']:.{digits}f} {sign} {agg['std']:.{digits}f}"


def _print_final(m: dict, out: Path) -> None:
    print(f"\nfinal stage of {m['study']} ({m['status']}); test split: {m['protocol_note']}")
    b = m.get("baseline")
    groups = [("", m["seeds"])] + ([(f"{b['name']} recipe ", b["seeds"])] if b else [])
    for label, seeds in groups:
        for s in seeds:
            if s["status"] != "complete":
                print(f"  {label}seed {s['seed']}: {s['status']}: {s.get('message', '')}")
                continue
            print(f"  {label}seed {s['seed']}: best val {s['best_val_acc']:.2f} % at epoch {s['best_epoch']}; "
                  "test top-1 " + ", ".join(f"{n} {s['models'][n]['top1']:.2f} %" for n in MODELS))
    n_seeds = len(next(iter(m["aggregate"].values()))["top1"]["values"]) if m["aggregate"] else 0
    if m["aggregate"]:
        print(f"  test top-1 / top-2 %, {'mean +- std over ' if n_seeds > 1 else ''}{n_seeds} seed(s):")
    for n, a in m["aggregate"].items():
        line = f"  {n:<9} top-1 {pm(a['top1']):>14}   top-2 {pm(a['top2']):>14}"
        if b and n in b.get("difference", {}):
            line += (f"   {b['name']} recipe top-1 {pm(b['aggregate'][n]['top1']):>14}   difference "
                     f"{b['difference'][n]['top1']:+.2f} points")
        print(line)
    print(f"results: {out / 'metrics.json'}; model: {out / 'model.pt'}")
