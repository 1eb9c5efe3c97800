"""A study's final stage as one MLflow run in the study's experiment (see fer_tune.tune.mlflow.tracking), tag stage=final:

- params: the retrained configuration (its TrainConfig), the fine-tune settings (finetune_*), the seeds, the trial;
- metrics: every seed's epochs, step = epoch: seed_S/KEY in training, seed_S/finetune/KEY in the fine-tune (a
  baseline's under BASELINE/seed_S/...), KEY in final_outputs.HISTORY_KEYS; once the stage is complete its test
  metrics (step 0): test_{top1,top2,macro_f1}_{last,best_val,finetuned} (mean over the seeds, _std beside it with
  two or more), seed_S/test_..., a baseline's BASELINE/test_... and BASELINE/difference_..., device_hours;
- artifacts: every file the stage exports (model.*: model.pt, model.pt2, model.json, ...) under model/, and
  metrics.json, history.csv, final.json;
- tags: study, study_created, final_created, final_dir, optuna_trial and ray_trial_id (the retrained trial's),
  outcome (complete, partial); status FINISHED (complete), FAILED (a seed failed), KILLED (interrupted).

The run is found by final_created (final.json's creation time), so a continued or re-run stage logs into it; its
epochs are caught up from the stage's results when a command starts and ends, and the test metrics and files are
sent when it is complete (again by `fer-tune final` on a complete stage, until MLflow has them).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ... import __version__
from ...recipe import MODELS
from ..final.outputs import HISTORY_KEYS, WINNER, FinalRecord, write_history
from ..runtime import storage
from .tracking import Mlflow, Run, Tracking, attach, long_requests, numeric

log = logging.getLogger(__name__)

EXPORTS = "model.*"  # the exported model's files at the top of the final stage's directory
RECORDS = ("metrics.json", "history.csv", "final.json")
TEST_KEYS = ("top1", "top2", "macro_f1")


def final_points(row: dict) -> list[tuple[str, float, int]]:
    """One epoch of a seed (a Tune result or a history.csv row) as MLflow points; none for a diverged epoch."""
    phase = row.get("phase")
    if phase not in ("train", "finetune") or "epoch" not in row or not numeric(row.get("train_loss")):
        return []
    if not math.isfinite(float(row["train_loss"])):
        return []
    arm = row.get("arm") or WINNER
    prefix = (
        ("" if arm == WINNER else f"{arm}/") + f"seed_{row['seed']}/" + ("finetune/" if phase == "finetune" else "")
    )
    return [(prefix + k, float(row[k]), int(row["epoch"])) for k in HISTORY_KEYS if numeric(row.get(k))]


def test_points(m: dict) -> list[tuple[str, float, int]]:
    """A complete final stage's test metrics (its metrics.json) as MLflow points at step 0."""
    points = []

    def add(prefix: str, agg: dict) -> None:
        for model, metrics in agg.items():
            for k, v in metrics.items():
                points.append((f"{prefix}test_{k}_{model}", v["mean"], 0))
                if len(v["values"]) > 1:
                    points.append((f"{prefix}test_{k}_{model}_std", v["std"], 0))

    add("", m.get("aggregate", {}))
    for s in m.get("seeds", []):
        if s.get("status") == "complete":
            points.append((f"seed_{s['seed']}/best_val_acc", s["best_val_acc"], 0))
            points += [
                (f"seed_{s['seed']}/test_{k}_{model}", s["models"][model][k], 0) for model in MODELS for k in TEST_KEYS
            ]
    b = m.get("baseline")
    if b:
        add(f"{b['name']}/", b.get("aggregate", {}))
        for model, diff in b.get("difference", {}).items():
            points += [(f"{b['name']}/difference_{k}_{model}", v, 0) for k, v in diff.items()]
    e = m.get("ensemble")
    if e:  # the ensemble of the fine-tuned members, and what it adds to member 1 and to the baseline
        add("ensemble/", {"finetuned": e.get("aggregate", {})})
        for key in ("difference", "baseline_difference"):
            points += [(f"ensemble/{key}_{k}_finetuned", v, 0) for k, v in e.get(key, {}).items()]
    points.append(("device_hours", m.get("device_hours", 0.0), 0))
    return [(k, float(v), s) for k, v, s in points if numeric(v)]


class FinalTracking(Tracking):
    """Tune callback (in the driver) for the final stage's run; finish() at the end of the command."""

    def __init__(self, out: Path, rec: FinalRecord):
        super().__init__(out, rec)
        self._out, self._rec = out, rec
        self.ml = Mlflow(rec["mlflow"], rec["study"])
        self.run: Run | None = None

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.guard(lambda: self._open() and self.ml.set_status(self.run, "RUNNING"))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.guard(self._result, result)

    def finish(self, metrics: dict | None, rows: list[dict]) -> None:
        """At the end of a final-stage command: the epochs MLflow missed, then for a stage that ended (`metrics`, its
        metrics.json) the test metrics, the files and the run's end; an interrupted stage's run is KILLED."""
        self.guard(self._finish, metrics, rows)

    def _start(self) -> None:
        if self.connect(self.ml) and self._open() and self.run.status not in ("FINISHED", "FAILED"):
            self._catch_up()

    def _catch_up(self) -> None:
        exp = storage.join(self._rec["ray_storage"], "tune")
        if self.run is not None and storage.exists(exp):
            self.ml.log(self.run, [p for row in write_history(self._out, exp) for p in final_points(row)])

    def _result(self, result: dict) -> None:
        if self._open():
            self.ml.log(self.run, final_points(result))
        if self.ml.came_back:
            self.ml.came_back = False
            self._catch_up()

    def _open(self) -> bool:
        """The stage's run, found or made, with its params (False when MLflow is away)."""
        if self.run is None and self.ml.client is not None:
            rec = self._rec
            found = self.ml.find_runs(stage="final", final_created=str(rec["created"]))
            if found is None:
                return False
            tags = {
                "stage": "final",
                "study": rec["study"],
                "final_created": str(rec["created"]),
                "final_dir": str(self._out),
                "optuna_trial": str(rec["trial"]["number"]),
                "ray_trial_id": str(rec["trial"].get("ray_trial_id") or ""),
                "fer_tune": __version__,
            }
            self.run = self.ml.known(found[0]) if found else self.ml.create_run("final", tags)
        if self.run is not None and not self.run.has_params:
            rec = self._rec
            params = {
                **rec["config"],
                **{f"finetune_{k}": v for k, v in rec["finetune"].items()},
                "seeds": ",".join(map(str, rec["seeds"])),
                "trial": rec["trial"]["number"],
                "baseline": ",".join(rec.get("baselines", {})) or "none",
            }
            return self.ml.log_params(self.run, params)  # False: away before they went through, sent next time
        return self.run is not None

    def _finish(self, metrics: dict | None, rows: list[dict]) -> None:
        if self.ml.client is None:
            return
        done = self._open() and self.ml.log(self.run, [p for row in rows for p in final_points(row)])
        if done and metrics is None:
            done = self.ml.set_status(self.run, "KILLED", tags={"outcome": "interrupted"})
        elif done:
            done = self.ml.log(self.run, test_points(metrics)) and self._files()
            status = "FINISHED" if metrics.get("status") == "complete" else "FAILED"
            done = done and self.ml.set_status(self.run, status, tags={"outcome": metrics.get("status", "")})
        if not done and not self._broken:
            log.warning(
                "fer-tune: MLflow at %s does not hold all of the final stage yet; `fer-tune final %s` sends the rest "
                "once it answers",
                self.ml.ref,
                self._rec["study_dir"],
            )

    def _files(self) -> bool:
        """The exported model files (every model.* there) under model/, and the stage's records."""
        run = self.run
        files = [(p, "model") for p in sorted(self._out.glob(EXPORTS)) if p.is_file()]
        files += [(self._out / n, None) for n in RECORDS if (self._out / n).is_file()]
        with long_requests():
            for path, where in files:
                if (
                    self.ml.call(f"upload {path.name}", lambda c, p=path, w=where: c.log_artifact(run.id, str(p), w))
                    is None
                ):
                    return False
        return True


def final_tracking(out: Path, rec: FinalRecord) -> FinalTracking | None:
    return FinalTracking(out, rec) if rec.get("mlflow") else None


def track_final(tuner: Any, out: Path, rec: FinalRecord) -> FinalTracking | None:
    """The final stage's Tuner tracks the stage in MLflow when final.json says so; the callback, for finish()."""
    tracking = final_tracking(out, rec)
    attach(tuner, tracking)
    return tracking


def catch_up_final(out: Path, rec: FinalRecord) -> None:
    """A complete final stage's run brought up to it (nothing to send when MLflow holds it all)."""
    import csv
    import json

    tracking = final_tracking(out, rec)
    if tracking is None:
        return
    tracking.setup()
    if tracking.run is not None and tracking.run.status in ("FINISHED", "FAILED"):
        return
    rows = []
    if (out / "history.csv").is_file():
        with open(out / "history.csv", newline="") as fh:
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    tracking.finish(json.loads((out / "metrics.json").read_text()), rows)


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
