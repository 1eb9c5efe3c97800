"""What a PBT stage writes: population.csv and lineage.json (from its Ray experiment, also of an unfinished stage),
the best member evaluated on the test split with TenCrop and exported (fer_tune.recipe.evaluate_and_export, as a
final stage's model) in best/ and beside it, metrics.json; and the stage's progress lines."""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ...common import EXPORTS, write_atomic, write_json
from ..runtime.progress import TrialProgress
from .read import KEYS, PbtRecord, clones, member_number, read_members, schedule_rows

log = logging.getLogger(__name__)


def write_population(out: Path, exp: str, rec: PbtRecord) -> list[dict]:
    """population.csv (every member's every epoch, per segment) and lineage.json; returns the members."""
    members = read_members(exp)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["member", "segment", "origin_trial", "epoch", *KEYS])
    w.writeheader()
    for m in members:
        for seg in m["segments"]:
            since = seg["since"]
            label = f"member {member_number(since.split('@')[0])} at epoch {since.split('@')[1]}" if since else "own"
            for r in seg["rows"]:
                w.writerow(
                    {"member": m["member"], "segment": label, "origin_trial": origin_trial(rec, r), "epoch": r["epoch"]}
                    | {k: r.get(k, "") for k in KEYS}
                )
    write_atomic(out / "population.csv", buf.getvalue())
    epochs = rec["settings"]["epochs"]
    write_json(
        out / "lineage.json",
        {
            "clones": clones(members),
            "members": {
                str(m["member"]): {
                    "trial_id": m["trial_id"],
                    "origin_trial": rec["members"][m["origin"]]["trial"]["number"],
                    "schedule": schedule_rows(m["lineage"], epochs),
                    "clones": len(m["lineage"].get("clones", [])),
                }
                for m in members
            },
        },
    )
    return members


def origin_trial(rec: PbtRecord, row: dict) -> int:
    """The study trial a result's weights descend from."""
    return rec["members"][int(row.get("origin", 0))]["trial"]["number"]


def _evaluate(checkpoint: Any, data: dict, provenance: dict) -> dict[str, bytes]:
    """In a Ray task: the member's last weights measured on the test split and exported; the files' bytes."""
    from ...config import TrainConfig
    from ...device import select_device
    from ...recipe import SeedState, evaluate_and_export
    from ...train import load_checkpoint

    with checkpoint.as_directory() as d:
        fit_state = load_checkpoint(Path(d) / "state.pt")
    cfg = TrainConfig.from_dict({**fit_state["config"], "weights": ""}, source="member config")
    state = SeedState(seed=cfg.seed, arm="pbt", train_history=fit_state["history"], best=dict(fit_state["best"]))
    with tempfile.TemporaryDirectory() as tmp:
        best = Path(tmp) / "best"
        evaluate_and_export(
            cfg, cfg, {"last": fit_state["model"]}, data, select_device(), best, state, provenance=provenance
        )
        return {p.name: p.read_bytes() for p in best.iterdir() if p.is_file()}


def evaluate_best(out: Path, rec: PbtRecord, grid: Any, members: list[dict], data: Any) -> int:
    """The best member at the last epoch, evaluated and exported in best/ (model files copied beside), and
    metrics.json; 1 when no member reached the last epoch."""
    import ray

    s, metric = rec["settings"], rec["metric"]
    done = [m for m in members if m["last"]["epoch"] == s["epochs"] and m["last"].get("status") != "diverged"]
    if not done:
        log.warning("no member of the population trained all %d epochs (see population.csv)", s["epochs"])
        return 1
    best = (max if rec["mode"] == "max" else min)(done, key=lambda m: m["last"][metric])
    result = next(r for r in grid if (r.metrics or {}).get("trial_id") == best["trial_id"])
    origin = rec["members"][best["origin"]]
    info = {
        "member": best["member"],
        "trial_id": best["trial_id"],
        "value": best["last"][metric],
        "epoch": s["epochs"],
        "trial": origin["trial"],
        "schedule": best["lineage"]["schedule"],
        "clones": best["lineage"]["clones"],
    }
    log.info(
        "evaluating member %d (%s %.2f at epoch %d) on the test split",
        best["member"],
        metric,
        info["value"],
        s["epochs"],
    )
    res = rec["resources"]
    task = ray.remote(_evaluate).options(num_cpus=res["cpu"], num_gpus=res["gpu"])
    provenance = {"data": data.describe(), "study": rec["study"], "trial": {**origin["trial"], "pbt": info}}
    files = ray.get(task.remote(result.checkpoint, {"test": data.arrays("test")}, provenance))
    dest = out / "best"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    for name, blob in files.items():
        (dest / name).write_bytes(blob)
        if name in EXPORTS:
            (out / name).write_bytes(blob)
    evaluated = json.loads(files["metrics.json"])
    info["config"] = {**rec["bases"][best["origin"]], **{k: best["last"][k] for k in s["mutate"]}}
    write_json(
        out / "metrics.json",
        {
            "study": rec["study"],
            "status": "complete",
            "protocol": rec["protocol"],
            "protocol_note": rec["protocol_note"],
            "test_split": "test (" + rec["protocol_note"] + ")",
            "metric": metric,
            "mode": rec["mode"],
            "settings": s,
            "best": info,
            "test": evaluated["models"]["last"],
            "members": [
                {
                    "member": m["member"],
                    "origin_trial": rec["members"][m["origin"]]["trial"]["number"],
                    "epoch": m["last"]["epoch"],
                    "value": m["last"].get(metric),
                    "clones": len(m["lineage"].get("clones", [])),
                }
                for m in members
            ],
            "clones": len(clones(members)),
            "device_hours": round(sum(float(m["last"].get("device_seconds", 0.0)) for m in members) / 3600, 4),
            "wall_seconds": round(rec["wall_seconds"], 1),
        },
    )
    log.info(
        "best member %d: %s %.2f; test top-1 %.2f %% (TenCrop); model %s",
        best["member"],
        metric,
        info["value"],
        evaluated["models"]["last"]["top1"],
        out / "model.pt",
    )
    return 0


class _PopulationProgress(TrialProgress):
    """The trials' lines, named as members, with a line for every clone."""

    def __init__(self, rec: PbtRecord):
        epochs = rec["settings"]["epochs"]
        metric = rec["metric"]

        def ended(result: dict, at: int) -> str:
            v = result.get(metric)
            return f"finished: {metric} {v:.2f} at epoch {at}" if isinstance(v, (int, float)) else "finished"

        super().__init__(
            metric=metric,
            mode=rec["mode"],
            total=rec["settings"]["population"],
            epochs={"": epochs},
            name=lambda t: f"member {member_number(t.trial_id)}",
            ended=ended,
            params=False,
        )
        self._since: dict[str, str] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        since = result.get("since", "")
        if since and self._since.get(trial.trial_id, "") != since:
            donor, epoch = since.split("@")
            log.info(
                "member %d took member %d's weights at epoch %s",
                member_number(trial.trial_id),
                member_number(donor),
                epoch,
            )
        self._since[trial.trial_id] = since
        super().on_trial_result(iteration, trials, trial, result, **info)


def population_progress(rec: PbtRecord) -> Any:
    return _PopulationProgress(rec)
