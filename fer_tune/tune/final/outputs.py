"""What a final stage leaves behind, read from its Ray experiment: each seed's outputs in seed-S/ (a baseline's in
baseline-NAME/seed-S/), metrics.json (per seed and mean +- std over seeds), history.csv (every epoch, also of an
unfinished stage), and the lines the final command prints."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

from ...common import EXPORTS, write_atomic, write_json
from ...recipe import MODELS, aggregate, pm
from ..runtime import storage
from ..runtime.checkpoints import checkpointed_results
from ..runtime.layout import trial_results
from ..runtime.stage import StageRecord
from .ensemble import ENSEMBLE_DIR, WINNER, is_member, run_dir


class FinalRecord(StageRecord, total=False):
    """final.json: the stage record, the retrained trial and its config, the settings, the fine-tune, the seeds."""

    trial: dict  # number, ray_trial_id, metric, value, epoch, params
    config: dict  # the TrainConfig of the winner's runs
    settings: dict  # FINAL_DEFAULTS' keys with the values used, and the trial
    finetune: dict  # epochs, lr, scheduler, on
    seeds: list[int]
    eval_every: int
    track_crops: str
    schedule: dict  # a PBT member's replayed schedule (--from-pbt)
    baselines: dict  # {name: TrainConfig dict} run beside the winner
    members: list  # an ensemble's members after the winner: {"arm", "trial", "config"} (fer_tune.tune.final.ensemble)
    mlflow: str | None


def run_count(rec: FinalRecord) -> int:
    """The stage's runs: every seed of the winner, of an ensemble's other members and of the baselines."""
    return len(rec["seeds"]) * (1 + len(rec.get("baselines", {})) + len(rec.get("members", [])))


HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc", "lr", "epoch_seconds")


def collect(out: Path, rec: FinalRecord, grid: Any, data: Any) -> dict | None:
    """Per-seed outputs from the finished checkpoints into seed-S/ (an ensemble member's into member-I/seed-S/, a
    baseline's into baseline-NAME/seed-S/), then metrics.json; None if a run is unfinished. `data`: the stage's
    FerData (an ensemble's test labels and exported model's check)."""
    from .ensemble import summarize

    arms: dict[str, list[dict]] = {}
    for r in grid:
        m = r.metrics or {}
        cfg = r.config or {}
        seed, arm = int(cfg.get("seed", m.get("seed", -1))), cfg.get("arm", WINNER)
        if m.get("status") == "done" and r.checkpoint is not None:
            dest = run_dir(out, arm, seed)
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
    members = {a: sorted(arms.pop(a), key=lambda s: s["seed"]) for a in [a for a in arms if is_member(a)]}
    baselines = {}
    for name, runs in sorted(arms.items()):
        runs.sort(key=lambda s: s["seed"])
        done = [s for s in runs if s["status"] == "complete"]
        baselines[name] = {
            "name": name,
            "config": rec["baselines"][name],
            "seeds": runs,
            "aggregate": aggregate(done),
            "status": "complete" if len(done) == len(runs) else "partial",
        }
    everything = seeds + [s for b in baselines.values() for s in b["seeds"]] + [s for r in members.values() for s in r]
    metrics = {
        "study": rec["study"],
        "protocol": rec["protocol"],
        "protocol_note": rec["protocol_note"],
        "test_split": "test (" + rec["protocol_note"] + ")",
        "trial": rec["trial"],
        "config": rec["config"],
        "finetune": rec["finetune"],
        "seeds": seeds,
        "aggregate": aggregate(ok),
        "device_hours": round(sum(s["device_seconds"] for s in everything) / 3600, 4),
        "wall_seconds": round(rec["wall_seconds"], 1),
        "status": "complete" if all(s["status"] == "complete" for s in everything) else "partial",
    }
    for b in baselines.values():  # the winner's mean minus the baseline's over the seeds both completed
        both = sorted({s["seed"] for s in ok} & {s["seed"] for s in b["seeds"] if s["status"] == "complete"})
        w_agg, b_agg = (aggregate([s for s in runs if s["seed"] in both]) for runs in (ok, b["seeds"]))
        b["difference_seeds"] = both
        b["difference"] = {
            n: {k: w_agg[n][k]["mean"] - b_agg[n][k]["mean"] for k in ("top1", "top2", "macro_f1")}
            for n in MODELS
            if n in w_agg and n in b_agg
        }
    if baselines:
        metrics["baseline"] = next(iter(baselines.values()))
    exported = None  # the outputs whose model files go beside final.json
    if rec.get("members"):
        metrics["ensemble"] = summarize(out, rec, seeds, members, data, metrics.get("baseline"))
        metrics["exported"] = "ensemble"
        if metrics["ensemble"]["status"] != "complete":
            metrics["status"] = "partial"
        if "exported_seed" in metrics["ensemble"]:
            exported = out / ENSEMBLE_DIR / f"seed-{metrics['ensemble']['exported_seed']}"
    elif ok:
        metrics["exported_seed"] = max(ok, key=lambda s: s["best_val_acc"])["seed"]
        exported = run_dir(out, WINNER, metrics["exported_seed"])
    if exported is not None:
        for f in EXPORTS:
            if (exported / f).exists():  # model.onnx is missing where its check failed (model.json says why)
                shutil.copy2(exported / f, out / f)
            elif (out / f).exists():
                (out / f).unlink()
    write_json(out / "metrics.json", metrics)
    return metrics


def write_history(out: Path, exp: str) -> list[dict]:
    """history.csv from the seeds' Ray results in `exp` (a re-run epoch's later report wins); works on partial
    runs."""
    rows: dict[tuple, dict] = {}

    def add(r: dict, replace: bool) -> None:
        if r.get("phase") not in ("train", "finetune") or "epoch" not in r or "train_loss" not in r:
            return
        arm = r.get("arm", WINNER)
        key = (arm != WINNER, arm, r["seed"], r["phase"] != "train", r["epoch"])
        if replace or key not in rows:
            rows[key] = {
                "seed": r["seed"],
                "phase": r["phase"],
                "epoch": r["epoch"],
                **{k: r.get(k, "") for k in HISTORY_KEYS},
                "arm": arm,
            }

    for trial_dir in storage.listdir(exp):
        for r in trial_results(storage.join(exp, trial_dir)):
            add(r, replace=True)
        # epochs a killed driver did not write to result.json: the copy in each checkpoint
        for r in checkpointed_results(storage.join(exp, trial_dir)):
            add(r, replace=False)
    table = [rows[k] for k in sorted(rows)]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["seed", "phase", "epoch", *HISTORY_KEYS, "arm"])
    w.writeheader()
    w.writerows(table)
    write_atomic(out / "history.csv", buf.getvalue())
    return table


def result_lines(m: dict, out: Path) -> list[str]:
    """A finished final stage (its metrics.json) in a few lines: per seed, then mean +- std over the seeds."""
    lines = [f"final stage of {m['study']} ({m['status']}); test split: {m['protocol_note']}"]
    b = m.get("baseline")
    groups = [("", m["seeds"])] + ([(f"{b['name']} recipe ", b["seeds"])] if b else [])
    for label, seeds in groups:
        for s in seeds:
            if s["status"] != "complete":
                lines.append(f"  {label}seed {s['seed']}: {s['status']}: {s.get('message', '')}")
                continue
            lines.append(
                f"  {label}seed {s['seed']}: best val {s['best_val_acc']:.2f} % at epoch {s['best_epoch']}; "
                "test top-1 " + ", ".join(f"{n} {s['models'][n]['top1']:.2f} %" for n in MODELS)
            )
    n_seeds = len(next(iter(m["aggregate"].values()))["top1"]["values"]) if m["aggregate"] else 0
    if m["aggregate"]:
        lines.append(f"  test top-1 / top-2 %, {'mean +- std over ' if n_seeds > 1 else ''}{n_seeds} seed(s):")
    for n, a in m["aggregate"].items():
        line = f"  {n:<9} top-1 {pm(a['top1']):>14}   top-2 {pm(a['top2']):>14}"
        if b and n in b.get("difference", {}):
            line += (
                f"   {b['name']} recipe top-1 {pm(b['aggregate'][n]['top1']):>14}   difference "
                f"{b['difference'][n]['top1']:+.2f} points"
            )
        lines.append(line)
    if m.get("ensemble"):
        lines += ensemble_lines(m["ensemble"], b)
    lines.append(f"results: {out / 'metrics.json'}; model: {out / 'model.pt'}")
    return lines


def ensemble_lines(e: dict, baseline: dict | None) -> list[str]:
    """An ensemble stage's members and ensemble, fine-tuned, test top-1 (mean +- std over its seeds)."""
    lines = [f"  ensemble of {len(e['members'])} members, each fine-tuned; test top-1 %:"]
    for i, mem in enumerate(e["members"], 1):
        t, agg = mem["trial"], mem["aggregate"]
        about = f"trial {t['number']} (study {t['metric']} {t['value']:.2f})"
        lines.append(f"    member {i}  {about:<28} " + (f"{pm(agg['top1']):>14}" if agg else "did not complete"))
    for s in e["seeds"]:
        if s["status"] != "complete":
            lines.append(f"    seed {s['seed']}: {s['status']}: {s.get('message', '')}")
    if e["aggregate"]:
        line = f"    ensemble  {'(the mean of their softmax)':<28} {pm(e['aggregate']['top1']):>14}"
        if "difference" in e:
            line += f"   {e['difference']['top1']:+.2f} points on member 1 (the study's best, validation's pick)"
        if "baseline_difference" in e and baseline:
            line += f", {e['baseline_difference']['top1']:+.2f} on the {baseline['name']} recipe"
        lines.append(line)
    return lines


def _seed_name(trial: Any) -> str:
    config = trial.config or {}
    arm = config.get("arm", WINNER)
    which = "" if arm == WINNER else f" ({arm})" if is_member(arm) else f" ({arm} recipe)"
    return f"seed {config.get('seed', '?')}{which}"


def _seed_ended(result: dict, epochs: int) -> str:
    if result.get("status") == "diverged":
        return "diverged (loss NaN / inf)"
    test = result.get("test_acc")
    return f"finished: test top-1 {test:.2f} % (fine-tuned, TenCrop)" if isinstance(test, (int, float)) else "finished"


def final_progress(rec: FinalRecord) -> Any:
    """The final stage's progress lines (fer_tune.tune.runtime.progress): per seed, its train and fine-tune epochs."""
    from ..runtime.progress import TrialProgress

    return TrialProgress(
        metric="val_acc",
        mode="max",
        total=run_count(rec),
        name=_seed_name,
        ended=_seed_ended,
        epochs={"train": rec["config"]["epochs"], "finetune": rec["finetune"]["epochs"]},
        params=False,
        best=False,  # seeds of one configuration: no race to report
    )
