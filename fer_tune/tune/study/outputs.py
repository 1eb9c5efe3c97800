"""Reading a study back: Ray's per-trial results + the Optuna storage -> one row per trial (trials.csv).

Only files and the Optuna storage are read; no Ray runtime is needed, so `fer-tune status` works while a study
runs, after it crashed, or on a laptop that copied results/NAME from the cluster. Experiment directories are
local paths or URIs (a study's Ray storage, e.g. s3://...): fer_tune.storage reads both.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ...common import FerTuneError, write_atomic
from ...cost import COST_METRICS
from ..runtime.checkpoints import checkpointed_results
from ..runtime.layout import experiment_trial_states, trial_results
from ..runtime.lock import holder
from ..runtime.storage import experiment_dirs, join, listdir
from .record import RunRecord, StudyRecord, epoch_values, load_optuna_study
from .spec import StudySpec, objectives

RESULT_KEYS = (
    "val_acc",
    "val_loss",
    "train_acc",
    "train_loss",
    "best_val_acc",
    "epoch",
    "training_iteration",
    "epoch_seconds",
    "device_seconds",
    "node",
    "node_id",
    "device",
    "precision",
    "status",
    "lr",
    "trial_id",
    "time_total_s",
    "start_epoch",
    "rss_mb",
    "pss_mb",
    "uss_mb",
    "store_rss_mb",
    "store_pss_mb",
    "trial_start",
    "timestamp",
    *COST_METRICS,
)


def scan_results(exp_dirs: Iterable[str | Path]) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """One pass over every trial's result.json (JSON lines) under the dirs:

    - {ray trial id: [per-epoch result, ...]}: a trial that restarted from a checkpoint reports some epochs
      twice; the later report wins;
    - {ray trial id: restarts}: how often it started again (crash retries, study resumes), seen as a new
      start_epoch or a step back in epochs.
    """
    results: dict[str, dict[int, dict]] = {}
    restarted: dict[str, int] = {}
    for d in exp_dirs:
        for trial_dir in listdir(d):
            last = None
            rows: dict[int, dict] = {}
            tid = None
            for row in trial_results(join(str(d), trial_dir)):  # none yet: only checkpoints
                tid = row.get("trial_id") or tid
                if not tid or "epoch" not in row:
                    continue
                rows[int(row["epoch"])] = _kept(row)
                key = (int(row.get("start_epoch", 0)), int(row["epoch"]))
                if last is not None and (key[0] != last[0] or key[1] <= last[1]):
                    restarted[tid] = restarted.get(tid, 0) + 1
                last = key
            tid = _add_checkpointed(join(str(d), trial_dir), tid, rows)
            if tid and rows:
                results.setdefault(tid, {}).update(rows)
    return {tid: [rows[e] for e in sorted(rows)] for tid, rows in results.items()}, restarted


def _kept(row: dict) -> dict:
    return {k: v for k, v in row.items() if k in RESULT_KEYS or k.startswith("val_recall_")}


def _add_checkpointed(trial_dir: str, tid: str | None, rows: dict[int, dict]) -> str | None:
    """Epochs whose result.json line a killed driver never wrote, from the copy each checkpoint holds."""
    for row in checkpointed_results(trial_dir, missing=lambda epoch: epoch not in rows):
        if row.get("trial_id", tid):
            tid = tid or row["trial_id"]
            rows[int(row["epoch"])] = {**_kept(row), "trial_id": tid}
    return tid


def read_results(exp_dirs: Iterable[str | Path]) -> dict[str, list[dict]]:
    """{ray trial id: [per-epoch result, ...]} (see scan_results)."""
    return scan_results(exp_dirs)[0]


def has_unfinished(record: StudyRecord, run: RunRecord, exp_dir: str, *, errors: bool = False) -> bool:
    """True when one run leaves trials to finish (left_to_finish); errors=True: errored ones too (resume retries)."""
    return left_to_finish(record, run, exp_dir, errors=errors) > 0


def left_to_finish(
    record: StudyRecord, run: RunRecord, exp_dir: str, *, errors: bool = True, states: dict | None = None
) -> int:
    """to_finish for one run by Tune's saved states (`states`: read from `exp_dir` when not given), less the run's
    trials that began and finished after Tune's last saved state: the Optuna study holds them finished and the
    searcher does not make them again (a driver stopped by a full disk, a kill)."""
    states = experiment_trial_states(exp_dir) if states is None else states
    return to_finish(states, run["num_samples"] - finished_unseen(record, run, states), errors=errors)


def finished_unseen(record: StudyRecord, run: RunRecord, states: dict[str, str]) -> int:
    """The run's finished Optuna trials (user attribute `run`) whose Tune trial `states` does not name."""
    try:
        trials = load_optuna_study(record).get_trials(deepcopy=False)
    except KeyError:  # the study was not made yet: the driver stopped before its first trial
        return 0
    return sum(
        t.state.name in ("COMPLETE", "PRUNED", "FAIL")
        and t.user_attrs.get("run") == run["dir"]
        and t.user_attrs.get("ray_trial_id") not in states
        for t in trials
    )


def to_finish(states: dict[str, str], num_samples: int, *, errors: bool = True) -> int:
    """How many trials of a run of `num_samples` are left to finish, by Tune's states {trial id: status}: those
    not finished (errored ones too, unless errors=False) and those Tune's state does not name yet (the searcher
    begins trials after Tune's last saved state: RUNNING in the Optuna study, a resume hands them to Tune's next
    trials; a driver killed before Tune saved any state leaves no state at all)."""
    done = ("TERMINATED",) if errors else ("TERMINATED", "ERROR")
    return sum(s not in done for s in states.values()) + max(0, num_samples - len(states))


def study_results(sdir: str | Path, record: StudyRecord) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """scan_results over every Ray experiment of the study (local or in its Ray storage)."""
    return scan_results(experiment_dirs(sdir, record))


def trials_table(
    sdir: str | Path, record: StudyRecord, scanned: tuple | None = None, live: bool | None = None
) -> list[dict]:
    """One row per Optuna trial with its Ray results (results/README.md); `live`: a command runs it now (or lock)."""
    sdir = Path(sdir)
    spec = record["spec"]
    metric = spec["metric"]
    runs = experiment_dirs(sdir, record)
    results, restarted = scanned or scan_results(runs)
    tune_states: dict[str, str] = {}
    for r in runs:
        tune_states.update(experiment_trial_states(r))
    es = spec["early_stopping"]
    rungs: list[int] = []
    if es["type"] == "asha":
        m = es["grace_period"]
        while m < spec["max_epochs"]:
            rungs.append(int(m))
            m *= es["reduction_factor"]
    study = load_optuna_study(record)
    if live is None:
        live = holder(sdir) is not None
    names = list(spec["space"])
    goals = objectives(spec)
    front = {t.number for t in study.best_trials} if len(goals) > 1 else set()
    rows = []
    for t in study.get_trials(deepcopy=False):
        tid = t.user_attrs.get("ray_trial_id", "")
        res = results.get(tid, [])
        if t.state.name in ("COMPLETE", "PRUNED") and epoch_values(t):
            # the study's decision stands: epochs a restarted trial ran after it (before it was stopped) are not its
            last = max(epoch_values(t))
            res = [r for r in res if r["epoch"] <= last]
        vals = [r[metric] for r in res if metric in r and r.get("status") != "diverged"]
        pick = max if spec["mode"] == "max" else min
        best = pick(vals) if vals else None
        best_epoch = next((r["epoch"] for r in res if vals and r.get(metric) == best), "")
        state = t.state.name
        status = t.user_attrs.get("status", "")
        if state == "RUNNING":  # running only while a command runs the study; else it was interrupted
            status = tune_states.get(tid, "RUNNING").lower() if live else "interrupted"
        row = {
            "number": t.number,
            "ray_trial_id": tid,
            "state": state,
            "status": status or state.lower(),
            "epochs": res[-1]["epoch"] if res else 0,
            f"best_{metric}": "" if best is None else round(best, 4),
            "best_epoch": best_epoch,
            f"last_{metric}": round(res[-1][metric], 4) if res and metric in res[-1] else "",
            "wall_seconds": round(sum(r.get("epoch_seconds", 0.0) for r in res), 2),
            "device_seconds": round(res[-1].get("device_seconds", 0.0), 2) if res else 0.0,
            "node": res[-1].get("node", "") if res else "",
            "device": res[-1].get("device", "") if res else "",
            "precision": res[-1].get("precision", "") if res else "",
            **{m: round(res[-1][m], 4) if res and m in res[-1] else "" for m in COST_METRICS},
            "nodes": len({r.get("node_id") for r in res}),
            "peak_pss_mb": max((r.get("pss_mb", 0) for r in res), default=0),
            "restarts": restarted.get(tid, 0),
            "warm_start": t.user_attrs.get("warm_start", ""),
        }
        if len(goals) > 1:  # the study's values (COMPLETE trials); `pareto`: on the Pareto front
            for i, (m, _) in enumerate(goals[1:], 1):
                if m not in COST_METRICS:
                    row[f"{m}_at_best"] = round(t.values[i], 4) if t.values else ""
            row["pareto"] = "yes" if t.number in front else ""
        by_epoch = {r["epoch"]: r for r in res}
        for m in rungs:
            row[f"{metric}@{m}"] = round(by_epoch[m][metric], 4) if m in by_epoch and metric in by_epoch[m] else ""
        for n in names:
            row[f"param_{n}"] = t.params.get(n, "")
        rows.append(row)
    return rows


def write_trials_csv(sdir: str | Path, record: StudyRecord, rows: list[dict] | None = None) -> list[dict]:
    """trials.csv (see results/README.md for the columns; `rows`: its trials_table, if read); returns its rows."""
    rows = trials_table(sdir, record) if rows is None else rows
    buf = io.StringIO(newline="")
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_atomic(Path(sdir) / "trials.csv", buf.getvalue())
    return rows


def status_summary(sdir: str | Path, record: StudyRecord, scanned: tuple | None = None) -> dict:
    """The study at a glance; `scanned`: study_results() when the caller has already read them."""
    running = {what: info for what, info in (("study", holder(sdir)), ("final", holder(Path(sdir) / "final"))) if info}
    rows = trials_table(sdir, record, scanned, live="study" in running)
    spec = record["spec"]
    total = sum(r["num_samples"] for r in record["runs"])
    states: dict[str, int] = {}
    for r in rows:
        states[r["status"]] = states.get(r["status"], 0) + 1
    best = pick_best(rows, spec)
    finished = sum(1 for r in rows if r["state"] in ("COMPLETE", "PRUNED", "FAIL"))
    return {
        "name": record["name"],
        "directory": str(sdir),
        "metric": spec["metric"],
        "mode": spec["mode"],
        "objectives": objectives(spec),
        "running": running,
        "num_samples": total,
        "trials": len(rows),
        "finished": finished,
        "states": states,
        "epochs_trained": sum(int(r["epochs"]) for r in rows),
        "device_hours": round(sum(float(r["device_seconds"]) for r in rows) / 3600, 4),
        "best": best,
        "rows": rows,
        "unread": unread_trials(rows),
        "experiments": experiment_dirs(sdir, record),
    }


def unread_trials(rows: list[dict]) -> int:
    """Completed or pruned trials without an epoch in the study's results (a copy without tune/, say)."""
    return sum(1 for r in rows if r["state"] in ("COMPLETE", "PRUNED") and not r["epochs"])


def ranked(rows: list[dict], metric: str, mode: str) -> list[dict]:
    """The trials.csv rows that scored `metric`, best first by their best value (`mode` max or min)."""
    key = f"best_{metric}"
    return sorted((r for r in rows if r[key] != ""), key=lambda r: float(r[key]), reverse=mode == "max")


def finalists(rows: list[dict], spec: dict) -> list[dict]:
    """The trials a final stage may take, best first by the first metric: those that did not fail; in a
    multi-objective study the Pareto front's (completed ones: a trial stopped early has no values)."""
    multi = len(objectives(spec)) > 1
    kept = [r for r in rows if r["state"] != "FAIL" and (not multi or r.get("pareto") == "yes")]
    return ranked(kept, spec["metric"], objectives(spec)[0][1])


def pick_best(rows: list[dict], spec: dict) -> dict | None:
    """The trial the final stage takes by default: the first of finalists()."""
    return next(iter(finalists(rows, spec)), None)


def best_trial(
    sdir: Path, record: StudyRecord, spec: StudySpec, number: int | None, rows: list[dict] | None = None
) -> dict:
    """The study's best finished trial (or trial `number`) with its full config; `rows`: its trials_table, if read."""
    rows = trials_table(sdir, record) if rows is None else rows
    key = f"best_{spec.metric}"
    if number is not None:
        row = next((r for r in rows if r["number"] == number), None)
        if row is None:
            raise FerTuneError(f"{sdir}: the study has no trial {number} (trials 0..{len(rows) - 1})")
        if row[key] == "":
            raise FerTuneError(f"{sdir}: trial {number} reported no {spec.metric} ({row['status']}); pick another")
    else:
        row = pick_best(rows, spec.to_dict())
        if row is None:
            what = "on the Pareto front (completed)" if spec.multi else f"with a {spec.metric}"
            raise FerTuneError(
                f"{sdir}: the study has no finished trial {what} yet ({len(rows)} trials); run or resume the sweep first"
            )
    import optuna

    trial = next(t for t in load_optuna_study(record).get_trials(deepcopy=False) if t.number == row["number"])
    constants = spec.define_by_run()(optuna.trial.FixedTrial(trial.params)) or {}
    params = {**trial.params, **constants}
    return {
        "number": row["number"],
        "ray_trial_id": row["ray_trial_id"],
        "metric": spec.metric,
        "value": float(row[key]),
        "epoch": row["best_epoch"],
        "params": params,
        "config": spec.trial_config(params).to_dict(),
    }


def _short(value: Any) -> str:
    """A trials.csv value as a person reads it: numbers to 4 significant digits."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}" if not float(number).is_integer() or "." in str(value) else str(value)


def objective_value(row: dict, metric: str, first: str) -> Any:
    """A trials.csv row's value of an objective: the first's best, a cost metric, or another's at the best epoch."""
    if metric == first:
        return row[f"best_{metric}"]
    return row[metric] if metric in COST_METRICS else row.get(f"{metric}_at_best", "")


def summary_lines(sdir: str | Path, spec: dict, table: list[dict]) -> list[str]:
    """A finished run in a few lines: trials by state, the best trial, where trials.csv is."""
    sdir = Path(sdir)
    metric, key = spec["metric"], "best_" + spec["metric"]
    states: dict[str, int] = {}
    for r in table:
        states[r["state"]] = states.get(r["state"], 0) + 1
    lines = [f"{sdir}: {len(table)} trials ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))})"]
    best = pick_best(table, spec)
    if best is not None:
        params = ", ".join(
            f"{k[len('param_') :]}={_short(v)}" for k, v in best.items() if k.startswith("param_") and v != ""
        )
        lines.append(
            f"best: trial {best['number']} {metric} {float(best[key]):.2f} at epoch {best['best_epoch']} with {params}"
        )
    goals = objectives(spec)
    if len(goals) > 1:
        front = sorted((r for r in table if r.get("pareto") == "yes"), key=lambda r: float(r[key]), reverse=True)
        lines.append(
            f"Pareto front ({', '.join(f'{m} {mode}' for m, mode in goals)}; completed trials): "
            + (
                "; ".join(
                    f"trial {r['number']} "
                    + ", ".join(f"{m} {_short(objective_value(r, m, metric))}" for m, _ in goals)
                    for r in front
                )
                or "none yet"
            )
        )
        if best is not None:
            lines.append(f"fer-tune final takes trial {best['number']}, the front's best {metric} (or pass --trial N)")
    errored = states.get("FAIL", 0)
    if errored:
        lines.append(
            f"{errored} trial(s) diverged or errored (see the status column); `fer-tune resume {sdir}` "
            "retries errored ones"
        )
    lines.append(f"trials: {sdir / 'trials.csv'}")
    return lines


class _TrialNumbers:
    """A Tune trial's Optuna number (as status and trials.csv number them), read when a trial id is first seen."""

    def __init__(self, record: StudyRecord):
        self._record = {k: record[k] for k in ("optuna_study", "storage")}
        self._numbers: dict[str, int] = {}

    def __call__(self, trial: Any) -> str:
        if trial.trial_id not in self._numbers:
            for t in load_optuna_study(self._record).get_trials(deepcopy=False):
                if t.user_attrs.get("ray_trial_id"):
                    self._numbers[t.user_attrs["ray_trial_id"]] = t.number
        number = self._numbers.get(trial.trial_id)
        return f"trial {number}" if number is not None else f"trial {trial.trial_id}"


def study_progress(record: StudyRecord, spec: StudySpec, run: RunRecord) -> Any:
    """The run's progress lines (fer_tune.tune.runtime.progress), trials named by their Optuna numbers."""
    from ..runtime.progress import TrialProgress

    metric, max_epochs = spec.metric, spec.max_epochs

    def ended(result: dict, epochs: int) -> str:
        value = result.get(metric)
        shown = f"{metric} {value:.2f}" if isinstance(value, (int, float)) else ""
        if result.get("status") == "diverged":
            return f"diverged at epoch {epochs} (loss NaN / inf)"
        if epochs < max_epochs:
            return f"pruned at epoch {epochs}: {shown}"
        best, at = result.get("best_" + metric), result.get("best_epoch")
        return f"completed: best {metric} {best:.2f} at epoch {at}" if isinstance(best, (int, float)) else "completed"

    return TrialProgress(
        metric=metric,
        mode=spec.mode,
        total=run["num_samples"],
        epochs={"": max_epochs},
        name=_TrialNumbers(record),
        ended=ended,
    )
