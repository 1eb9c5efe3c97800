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

from .common import EMOTIONS, FerTuneError, write_json

FINAL_FILE = "final.json"
MODELS = ("last", "best_val", "finetuned")
HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc", "lr", "epoch_seconds")
DEFAULTS = {"epochs": 300, "finetune_epochs": 50, "finetune_lr": 1e-4, "finetune_scheduler": "cosine",
            "finetune_on": "train+val", "seeds": 1, "eval_every": 25}


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
def _final_trial(config: dict, *, base: dict, finetune: dict, data: dict, eval_every: int, weight: float) -> None:
    from ray import tune

    from .config import TrainConfig
    from .models import load_tensor_file
    from .study import _memory_mb, _Splits
    from .train import fit, save_checkpoint, select_device

    seed = int(config["seed"])
    cfg = TrainConfig.from_dict({**base, "seed": seed}, source="final config")
    ft_cfg = cfg.replace(epochs=finetune["epochs"], lr=finetune["lr"], scheduler=finetune["scheduler"])
    device = select_device()
    progress: dict[str, Any] = {"phase": "train", "seed": seed}
    state = None
    weights: dict[str, Any] = {"best": None, "last": None}  # best-val and last-epoch weights of the train phase
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            d = Path(d)
            progress = json.loads((d / "progress.json").read_text())
            if (d / "state.pt").exists():
                state = load_tensor_file(d / "state.pt", "checkpoint")
            for k in weights:
                if (d / f"{k}.pt").exists():
                    weights[k] = load_tensor_file(d / f"{k}.pt", "checkpoint")["model"]
    if progress["phase"] == "done":
        return
    resumed_at = len(progress.get("train_history", [])) + len(progress.get("finetune_history", []))
    test = data["test"]

    def report(metrics: dict, st: dict | None, keep: float, outputs: Path | None = None) -> None:
        out = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        out.update(seed=seed, phase=progress["phase"], keep=keep, device=str(device), resumed_at=resumed_at,
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
            report(m, st, keep=1e6 + e if snapshot else float(e))
            return None

        res = fit(cfg, _Splits(data), device=device, checkpoint=state, on_epoch=on_train_epoch,
                  track=test, track_every=eval_every)
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
                  init_model=weights["best"], on_epoch=on_ft_epoch, track=test, track_every=eval_every)
        if res.status == "diverged":
            return
        progress.setdefault("finetune_history", res.history)
        finetuned = res.checkpoint["model"]

    # 3. evaluate last, best-val and fine-tuned on the test split with TenCrop; export the fine-tuned model
    progress["phase"] = "evaluate"
    with tempfile.TemporaryDirectory() as d:
        out_dir = Path(d) / "outputs"
        result = _evaluate_and_export(cfg, ft_cfg, {**weights, "finetuned": finetuned}, data, device, out_dir,
                                      progress)
        progress["phase"] = "done"
        weights.update(best=None, last=None)  # the exports hold them now
        report({"epoch": ft_cfg.epochs, "val_acc": result["best_val_acc"], "test_acc": result["models"]["finetuned"]
                ["top1"], "status": "done"}, None, keep=2e6, outputs=out_dir)


def _evaluate_and_export(cfg, ft_cfg, weights: dict, data: dict, device, out_dir: Path, progress: dict) -> dict:
    from .evaluate import evaluate_model, saliency_sample
    from .train import model_from_checkpoint, save_checkpoint

    out_dir.mkdir(parents=True)
    x_test, y_test = data["test"]
    models = {}
    key = {"last": "last", "best_val": "best", "finetuned": "finetuned"}
    for name in MODELS:
        model, _ = model_from_checkpoint({"config": cfg.to_dict(), "model": weights[key[name]]}, device)
        models[name] = evaluate_model(model, x_test, y_test, device=device, crops="ten",
                                      batch_size=cfg.eval_batch_size, amp=cfg.amp)
        _write_confusion(out_dir / f"confusion_{name}.csv", models[name]["confusion"])
    saliency_sample(model, x_test, y_test, out_dir, device=device, seed=cfg.seed)
    export = {"format": 1, "kind": "fer-tune model", "config": ft_cfg.to_dict(), "model": weights["finetuned"],
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
    result = {"seed": cfg.seed, "status": progress.get("status", "complete"),
              "best_epoch": progress["best"]["epoch"], "best_val_acc": progress["best"]["val_acc"],
              "history": progress["train_history"], "finetune_history": progress["finetune_history"],
              "models": models}
    write_json(out_dir / "metrics.json", result)
    return result


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
    conflicts = [f"--{k.replace('_', '-')} {v} (recorded: {rec['settings'][k]})" for k, v in given.items()
                 if v is not None and rec["settings"].get(k) != v]
    if conflicts:
        raise FerTuneError(f"{out} already holds a final stage with other settings: {', '.join(conflicts)}. Run it "
                           "again without these options to continue it, or pass --out DIR for a new one.")
    return rec


def run_final(study: str, *, trial: int | None, out: str | None, given: dict, gpus: float | None,
              address: str | None, quiet: bool, loader, num_cpus: int | None = None, force: bool = False) -> int:
    """`fer-tune final`: start, continue or report a study's final stage. ``given``: the options the user passed
    (None = not given) among DEFAULTS' keys."""
    from .storage import join, study_storage
    from .study import _reopen

    sdir = Path(study).resolve()
    out_p = Path(out).resolve() if out else sdir / "final"
    for k, v in given.items():
        if v is not None and k != "finetune_scheduler" and k != "finetune_on" and v <= 0:
            raise FerTuneError(f"--{k.replace('_', '-')} must be > 0, got {v}")
    if gpus is not None and gpus < 0:
        raise FerTuneError(f"--gpus-per-run must be >= 0, got {gpus}")
    record, spec, data = _reopen(sdir, force, loader)
    rec = _settings(out_p, {**given, "trial": trial})
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
               "resources": {"cpu": res["cpu"], "gpu": res["gpu"] if gpus is None else gpus},
               # Ray's experiment: beside the study's own (its --storage on a cluster), else in OUT
               "ray_storage": join(study_storage(sdir, record), out_p.name) if record.get("ray_storage")
               else str(out_p),
               "created": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_seconds": 0.0}
        from .config import TrainConfig

        TrainConfig.from_dict({**config, "epochs": settings["finetune_epochs"], "lr": settings["finetune_lr"],
                               "scheduler": settings["finetune_scheduler"]}, source="fine-tune settings")
        out_p.mkdir(parents=True, exist_ok=True)
        write_json(out_p / FINAL_FILE, rec)
        print(f"final stage of {record['name']}: trial {best['number']} ({spec.metric} {best['value']:.2f}) "
              f"with {best['params']}; {settings['epochs']} epochs + {settings['finetune_epochs']} fine-tune epochs "
              f"({settings['finetune_scheduler']} from lr {settings['finetune_lr']:g} on {settings['finetune_on']}), "
              f"seeds {seeds}; results in {out_p}", flush=True)
    elif (out_p / "metrics.json").exists():
        print(f"{out_p}: the final stage is complete")
        _print_final(json.loads((out_p / "metrics.json").read_text()), out_p)
        return 0
    else:
        print(f"continuing the final stage in {out_p} from its last checkpoints", flush=True)
    return _run_final(out_p, rec, data, address=address, quiet=quiet, num_cpus=num_cpus)


def _run_final(out: Path, rec: dict, data, *, address: str | None, quiet: bool, num_cpus: int | None) -> int:
    from . import storage
    from .study import _start, _stop

    started = _start(address, quiet, num_cpus, rec["ray_storage"], rec["resources"])
    from ray import tune

    try:
        res = rec["resources"]
        weight = res["gpu"] if res["gpu"] else res["cpu"]
        base = dict(rec["config"])
        base["threads"] = base.get("threads") or max(1, int(res["cpu"]))
        arrays = {s: data.arrays(s) for s in ("train", "val", "test")}
        trainable = tune.with_resources(
            tune.with_parameters(_final_trial, base=base, finetune=rec["finetune"], data=arrays,
                                 eval_every=rec["eval_every"], weight=weight),
            resources={"cpu": res["cpu"], "gpu": res["gpu"]})
        exp = storage.join(rec["ray_storage"], "tune")
        if storage.exists(storage.join(exp, "tuner.pkl")):
            tuner = tune.Tuner.restore(exp, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            keep = rec["config"]["epochs"] // rec["eval_every"] + 3  # snapshots, the finished one, the latest
            tuner = tune.Tuner(
                trainable, param_space={"seed": tune.grid_search(rec["seeds"])},
                tune_config=tune.TuneConfig(reuse_actors=False),
                run_config=tune.RunConfig(
                    name="tune", storage_path=rec["ray_storage"], verbose=0 if quiet else 1,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute="keep",
                                                            checkpoint_score_order="max"),
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
            return 130
        _print_final(done, out)
        return 0 if all(s["status"] == "complete" for s in done["seeds"]) else 1
    finally:
        _stop(started)


def _collect(out: Path, rec: dict, grid) -> dict | None:
    """Per-seed outputs from the finished checkpoints into seed-S/, then metrics.json; None if a seed is unfinished."""
    seeds: list[dict] = []
    for r in grid:
        m = r.metrics or {}
        seed = int((r.config or {}).get("seed", m.get("seed", -1)))
        if m.get("status") == "done" and r.checkpoint is not None:
            dest = out / f"seed-{seed}"
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
        seeds.append(s)
    seeds.sort(key=lambda s: s["seed"])
    ok = [s for s in seeds if s["status"] == "complete"]
    aggregate = {name: {k: _mean_std([s["models"][name][k] for s in ok]) for k in ("top1", "top2", "macro_f1")}
                 for name in MODELS} if ok else {}
    metrics = {"study": rec["study"], "protocol": rec["protocol"], "protocol_note": rec["protocol_note"],
               "test_split": "test (" + rec["protocol_note"] + ")", "trial": rec["trial"], "config": rec["config"],
               "finetune": rec["finetune"], "seeds": seeds, "aggregate": aggregate,
               "device_hours": round(sum(s["device_seconds"] for s in seeds) / 3600, 4),
               "wall_seconds": round(rec["wall_seconds"], 1),
               "status": "complete" if len(ok) == len(seeds) else "partial"}
    if ok:
        top = max(ok, key=lambda s: s["best_val_acc"])
        for f in ("model.pt", "model.pt2", "model.json"):
            shutil.copy2(out / f"seed-{top['seed']}" / f, out / f)
        metrics["exported_seed"] = top["seed"]
    write_json(out / "metrics.json", metrics)
    return metrics


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def write_history(out: Path, exp: str) -> list[dict]:
    """history.csv from the seeds' Ray results in `exp` (a re-run epoch's later report wins); works on partial
    runs."""
    from . import storage

    rows: dict[tuple, dict] = {}
    for trial_dir in storage.listdir(exp):
        text = storage.read_text(storage.join(exp, trial_dir, "result.json")) or ""
        for line in text.splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("phase") not in ("train", "finetune") or "epoch" not in r or "train_loss" not in r:
                continue
            rows[(r["seed"], r["phase"] != "train", r["epoch"])] = {
                "seed": r["seed"], "phase": r["phase"], "epoch": r["epoch"],
                **{k: r.get(k, "") for k in HISTORY_KEYS}}
    table = [rows[k] for k in sorted(rows)]
    tmp = out / ".history.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["seed", "phase", "epoch", *HISTORY_KEYS])
        w.writeheader()
        w.writerows(table)
    tmp.replace(out / "history.csv")
    return table


def _print_final(m: dict, out: Path) -> None:
    print(f"\nfinal stage of {m['study']} ({m['status']}); test split: {m['protocol_note']}")
    for s in m["seeds"]:
        if s["status"] != "complete":
            print(f"  seed {s['seed']}: {s['status']}: {s.get('message', '')}")
            continue
        print(f"  seed {s['seed']}: best val {s['best_val_acc']:.2f} % at epoch {s['best_epoch']}; test top-1 "
              + ", ".join(f"{n} {s['models'][n]['top1']:.2f} %" for n in MODELS))
    for n, a in m["aggregate"].items():
        print(f"  {n:<9} top-1 {a['top1']['mean']:.2f} +- {a['top1']['std']:.2f} %   "
              f"top-2 {a['top2']['mean']:.2f} +- {a['top2']['std']:.2f} %")
    print(f"results: {out / 'metrics.json'}; model: {out / 'model.pt'}")
