"""An ensemble final stage (`fer-tune final --ensemble K`): the study's K best distinct configurations, chosen on
the validation split, each retrained with the final stage's recipe and seeds as an arm of its own (member 1 is the
study's best, the stage's winner); per seed, the ensemble of the members' fine-tuned models.

The ensemble's prediction is fer_tune.models.combine_logits: per test crop, the log of the mean of the members'
softmax, then the mean over the crops (TenCrop), as any model's logits. Its test metrics come from the logits each
member saved (TEST_LOGITS), with no second pass over the test split; the exported model (ensemble/seed-S/ and, for
the seed chosen on validation, model.* beside final.json) computes the same.

results/NAME/final/
    seed-S/                member 1's run, as in any final stage (with its test logits)
    member-I/seed-S/       member I's run: metrics.json, test logits, its own exported model
    ensemble/seed-S/       metrics.json of the seed's ensemble and its model.pt, .pt2, .onnx, .json
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any

from ...common import write_json
from ...recipe import TEST_CROPS, TEST_LOGITS, mean_std

WINNER = "winner"  # the arm of the study's trial (an ensemble's member 1); a baseline's arm is its name
MEMBER_PREFIX = "member-"
ENSEMBLE_DIR = "ensemble"
KEYS = ("top1", "top2", "macro_f1")


def member_arm(i: int) -> str:
    """The arm of member `i` (2, 3, ...; member 1 is the winner's arm)."""
    return f"{MEMBER_PREFIX}{i}"


def is_member(arm: str) -> bool:
    return arm.startswith(MEMBER_PREFIX)


def run_dir(out: Path, arm: str, seed: int) -> Path:
    """Where a finished run's outputs go: seed-S/ (the winner), member-I/seed-S/, baseline-NAME/seed-S/."""
    if arm == WINNER:
        return out / f"seed-{seed}"
    return out / (f"{arm}/seed-{seed}" if is_member(arm) else f"baseline-{arm}/seed-{seed}")


def member_record(i: int, pick: dict, epochs: int) -> dict:
    """final.json's entry of member `i`: its arm, the study trial it retrains, its config with the stage's epochs."""
    trial = {k: pick[k] for k in ("number", "ray_trial_id", "metric", "value", "epoch", "params")}
    return {"arm": member_arm(i), "trial": trial, "config": {**pick["config"], "epochs": epochs}}


def describe_members(members: list[dict]) -> str:
    """'trial 4 (val_acc 45.20), PBT member 6 (from trial 2, val_acc 47.10)' for a launch line."""

    def one(t: dict) -> str:
        value = f"{t['metric']} {t['value']:.2f}"
        if "pbt_member" in t["params"]:
            return f"PBT member {t['params']['pbt_member']} (from trial {t['number']}, {value})"
        return f"trial {t['number']} ({value})"

    return ", ".join(one(m["trial"]) for m in members)


def summarize(
    out: Path, rec: dict, winner: list[dict], members: dict[str, list[dict]], data: Any, baseline: dict | None
) -> dict:
    """metrics.json's "ensemble": each member's runs and mean +- std, each seed's ensemble (measured from the
    members' saved test logits, exported to ensemble/seed-S/), its mean +- std, and its differences to member 1
    (the study's best, the member validation picks) and to the baseline recipe, each over the seeds both completed;
    `exported_seed`: the seed whose members did best on validation (their mean best val accuracy), whose ensemble
    becomes model.* of the stage."""
    from ...recipe import aggregate

    runs = {WINNER: winner, **members}
    arms = [(WINNER, rec["trial"])] + [(m["arm"], m["trial"]) for m in rec["members"]]
    x_test, y_test = data.arrays("test")
    seeds = []
    for seed in rec["seeds"]:
        of_seed = [next((s for s in runs[arm] if s["seed"] == seed), None) for arm, _ in arms]
        if not all(s is not None and s["status"] == "complete" for s in of_seed):
            seeds.append({"seed": seed, "status": "incomplete", "message": "a member did not complete this seed"})
            continue
        dirs = [run_dir(out, arm, seed) for arm, _ in arms]
        test = ensemble_metrics(dirs, y_test)
        val = statistics.fmean(s["best_val_acc"] for s in of_seed)
        dest = out / ENSEMBLE_DIR / f"seed-{seed}"
        _export(dest, dirs, arms, of_seed, test, rec, data, x_test)
        entry = {"seed": seed, "status": "complete", "members_best_val_acc": val, "test": _short(test)}
        write_json(dest / "metrics.json", {**entry, "test": test})
        seeds.append(entry)
    done = [s for s in seeds if s["status"] == "complete"]
    ens = {k: mean_std([s["test"][k] for s in done]) for k in KEYS} if done else {}
    summary: dict[str, Any] = {
        "combine": "per test crop the log of the mean of the members' softmax, then the mean over the crops",
        "members": [
            {
                "arm": arm,
                "trial": trial,
                "seeds": [{k: s.get(k) for k in ("seed", "status", "best_val_acc")} for s in runs[arm]],
                "aggregate": aggregate([s for s in runs[arm] if s["status"] == "complete"]).get("finetuned", {}),
            }
            for arm, trial in arms
        ],
        "seeds": seeds,
        "aggregate": ens,
        "status": "complete" if len(done) == len(seeds) else "partial",
    }
    mine = {s["seed"]: s["test"] for s in done}
    for key, other in (("difference", winner), ("baseline_difference", (baseline or {}).get("seeds", []))):
        theirs = {s["seed"]: s["models"]["finetuned"] for s in other if s["status"] == "complete"}
        both = sorted(set(mine) & set(theirs))
        if both:
            summary[f"{key}_seeds"] = both
            summary[key] = {k: statistics.fmean(mine[s][k] - theirs[s][k] for s in both) for k in KEYS}
    if done:
        summary["exported_seed"] = max(done, key=lambda s: s["members_best_val_acc"])["seed"]
    return summary


def ensemble_metrics(dirs: list[Path], labels: Any) -> dict:
    """The test metrics of the ensemble of the runs in `dirs`, from the test logits each saved."""
    import numpy as np
    import torch

    from ...evaluate import metrics_from_logits
    from ...models import combine_logits

    stacked = torch.stack([torch.from_numpy(np.load(d / TEST_LOGITS)) for d in dirs])  # (members, N, crops, 7)
    return {**metrics_from_logits(combine_logits(stacked).mean(1), labels), "crops": TEST_CROPS}


def _short(test: dict) -> dict:
    return {k: test[k] for k in (*KEYS, "n", "crops")}


def _export(
    dest: Path, dirs: list[Path], arms: list, of_seed: list[dict], test: dict, rec: dict, data: Any, x_test: Any
) -> None:
    """The seed's ensemble as one model in `dest` (fer_tune.export.export_ensemble), from the members' model.pt."""
    from ...export import export_ensemble
    from ...train import load_checkpoint

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    members = []
    for d, (arm, trial), s in zip(dirs, arms, of_seed):
        state = load_checkpoint(d / "model.pt")
        about = {
            "arm": arm,
            "trial": trial["number"],
            "params": trial["params"],
            "study_" + trial["metric"]: trial["value"],
            "best_val_acc": s["best_val_acc"],
            "test_top1": s["models"]["finetuned"]["top1"],
        }
        members.append({"config": state["config"], "model": state["model"], "about": about})
    provenance = {"data": data.describe(), "study": rec["study"], "trial": [t["number"] for _, t in arms]}
    export_ensemble(members, test, dest, provenance, x_test[:64], TEST_CROPS)
