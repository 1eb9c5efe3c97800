"""A PBT stage read back from files: its members' epochs, the clones and each member's schedule, from the Ray
experiment's results (result.json, and each checkpoint's copy of its epoch's result) and the stage's records.

No Ray runtime is needed: `fer-tune status` and the report read a stage that runs, was interrupted or finished.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...common import FerTuneError
from ..runtime import storage
from ..runtime.checkpoints import checkpointed_results
from ..runtime.layout import trial_results
from ..runtime.lock import describe, holder
from ..runtime.stage import StageRecord, located

PBT_DIR, PBT_FILE = "pbt", "pbt.json"


class PbtRecord(StageRecord, total=False):
    """pbt.json: the stage record, the options given and the settings, the study's metric, the members' starting
    trials, their configurations, the ranges perturbed, the population's first points, the seed."""

    given: dict
    settings: dict  # top_k, population, epochs, interval, mutate, method
    metric: str
    mode: str
    members: list[dict]
    bases: list[dict]
    mutations: dict
    points: list[dict]
    seed: int


REPLAY_DIR = "final-pbt"  # `fer-tune final --from-pbt`'s default directory
KEYS = ("val_acc", "val_loss", "train_acc", "train_loss", "lr", "weight_decay", "dropout", "epoch_seconds")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, OSError):
        return None


def cadence(settings: dict) -> str:
    """'every 5 epochs' (asynchronous: each member on its own) or 'every 5 epochs, synchronously'."""
    n = settings["interval"]
    return ("every epoch" if n == 1 else f"every {n} epochs") + (", synchronously" if settings.get("synch") else "")


def member_number(trial_id: str) -> int:
    """A member's number: its trial's index in the population (Tune's trial id ends in it)."""
    return int(str(trial_id).rsplit("_", 1)[-1])


def segments(rows: list[dict]) -> list[dict]:
    """A member's results in the order reported, cut where it took another's weights: [{since, rows}]. An epoch
    reported again in the same segment (a restart from an older checkpoint) replaces what followed it."""
    out: list[dict] = []
    for r in rows:
        if out and out[-1]["since"] == r.get("since", ""):
            seg = out[-1]["rows"]
            while seg and seg[-1]["epoch"] >= r["epoch"]:
                seg.pop()
            seg.append(r)
        else:
            out.append({"since": r.get("since", ""), "rows": [r]})
    return out


def read_members(exp: str) -> list[dict]:
    """The population of a stage's Ray experiment `exp`, by member number: [{member, trial_id, origin, segments,
    last (its latest result), lineage (of its latest weights)}]."""
    members = []
    for name in storage.listdir(exp):
        if not name.startswith("member_trial"):
            continue
        trial_dir = storage.join(exp, name)
        rows = {}
        for r in [
            *trial_results(trial_dir),
            *checkpointed_results(trial_dir),
        ]:
            if "epoch" in r and "reported_at" in r and r.get("trial_id"):
                rows[r["reported_at"]] = r
        if not rows:
            continue
        ordered = [rows[t] for t in sorted(rows)]
        last = ordered[-1]
        members.append(
            {
                "member": member_number(last["trial_id"]),
                "trial_id": last["trial_id"],
                "origin": int(last.get("origin", 0)),
                "segments": segments(ordered),
                "last": last,
                "lineage": json.loads(last.get("lineage") or "{}"),
            }
        )
    return sorted(members, key=lambda m: m["member"])


def clones(members: list[dict]) -> list[dict]:
    """Every clone the members reported, once, in the order of the epochs (member numbers in place of trial ids)."""
    seen: dict[tuple, dict] = {}
    for m in members:
        for seg in m["segments"]:
            for r in seg["rows"]:
                for e in json.loads(r.get("lineage") or "{}").get("clones", []):
                    key = (e["into"], e["from"], e["epoch"])
                    if key not in seen:
                        seen[key] = {**e, "into": member_number(e["into"]), "from": member_number(e["from"])}
    return sorted(seen.values(), key=lambda e: (e["epoch"], e["into"]))


def schedule_rows(lineage: dict, epochs: int) -> list[dict]:
    """A member's schedule as segments {first, last, values}."""
    segs = lineage.get("schedule", [])
    return [
        {"first": int(s[0]), "last": int(segs[i + 1][0]) - 1 if i + 1 < len(segs) else epochs, "values": s[1]}
        for i, s in enumerate(segs)
    ]


def stage(sdir: str | Path) -> dict | None:
    """The study's PBT stage, or None when it has none: its record, members, clones, metrics.json when finished,
    the replay's metrics when `final --from-pbt` ran, and who runs it now."""
    out = Path(sdir) / PBT_DIR
    rec = read_json(out / PBT_FILE)
    if rec is None:
        return None
    rec = located(rec, out)
    members = read_members(storage.join(rec["ray_storage"], "tune"))
    metrics, replay = read_json(out / "metrics.json"), read_json(Path(sdir) / REPLAY_DIR / "metrics.json")
    if not (metrics and replay and replay.get("trial", {}).get("ray_trial_id") == metrics["best"]["trial_id"]):
        replay = None  # none, or the replay of an earlier stage's member
    return {
        "dir": out,
        "record": rec,
        "members": members,
        "clones": clones(members),
        "metrics": metrics,
        "replay": replay,
        "running": holder(out),
    }


def _values(values: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


def status_lines(sdir: str | Path) -> list[str]:
    """The PBT stage in a few lines for `fer-tune status`; [] when the study has none."""
    found = stage(sdir)
    if found is None:
        return []
    rec, s = found["record"], found["record"]["settings"]
    metric, done = rec["metric"], found["metrics"]
    state = "complete" if done else "interrupted (fer-tune pbt continues it)"
    if found["running"]:
        state = f"being run by {describe(found['running'])}"
    lines = [
        "",
        f"PBT stage ({found['dir']}, {s['method'].upper()}): {s['population']} members from the top {s['top_k']} trials, "
        f"{s['epochs']} epochs, {', '.join(s['mutate'])} perturbed {cadence(s)}; {state}",
        f"{'member':>6} {'from trial':>10} {'epoch':>5} {metric:>8}  values now",
    ]
    for m in found["members"]:
        trial = rec["members"][m["origin"]]["trial"]["number"]
        value = m["last"].get(metric)
        shown = f"{value:.2f}" if isinstance(value, (int, float)) else "-"
        now = _values({k: m["last"][k] for k in s["mutate"] if k in m["last"]})
        lines.append(f"{m['member']:>6} {trial:>10} {m['last']['epoch']:>5} {shown:>8}  {now}")
    for e in found["clones"][-5:]:
        late = " (the last epoch: none trained with them)" if e["epoch"] >= s["epochs"] else ""
        lines.append(f"  epoch {e['epoch']}: member {e['into']} took member {e['from']}'s weights; {_changes(e)}{late}")
    if len(found["clones"]) > 5:
        lines.append(f"  ({len(found['clones'])} clones in all; lineage.json, the report)")
    if done:
        b = done["best"]
        lines.append(
            f"best: member {b['member']} ({metric} {b['value']:.2f} at epoch {b['epoch']}), test top-1 "
            f"{done['test']['top1']:.2f} % (TenCrop); model {found['dir'] / 'model.pt'}"
        )
    return lines


def _changes(event: dict) -> str:
    return ", ".join(f"{k} {event['old'][k]:.4g} -> {v:.4g}" for k, v in event["new"].items()) or "no change"


def replay_choice(sdir: Path) -> dict:
    """What `fer-tune final --from-pbt` retrains: the PBT stage's best member as a trial (number: the study trial
    its weights descend from), its config at the end and its schedule {epoch: values}."""
    m = read_json(sdir / PBT_DIR / "metrics.json")
    if m is None:
        why = "has no PBT stage" if not (sdir / PBT_DIR / PBT_FILE).is_file() else "has an unfinished PBT stage"
        raise FerTuneError(f"{sdir} {why}: --from-pbt replays its best member; run fer-tune pbt {sdir} first")
    b = m["best"]
    return _replayed(b["trial"], b["member"], b["trial_id"], m["metric"], b["value"], b["config"], b["schedule"])


def replay_choices(sdir: Path, k: int) -> list[dict]:
    """What `fer-tune final --from-pbt --ensemble K` retrains: the PBT stage's best member and the next K - 1
    members that trained all its epochs (best first by the stage's metric at the last epoch), each as
    replay_choice gives the best; fewer when fewer finished."""
    best = replay_choice(sdir)
    found = stage(sdir)
    assert found is not None  # replay_choice refused a study without one
    rec, s = found["record"], found["record"]["settings"]
    metric = rec["metric"]
    done = [
        m
        for m in found["members"]
        if m["last"]["epoch"] == s["epochs"]
        and m["last"].get("status") != "diverged"
        and metric in m["last"]
        and m["trial_id"] != best["ray_trial_id"]
    ]
    done.sort(key=lambda m: m["last"][metric], reverse=rec["mode"] == "max")
    return [best] + [
        _replayed(
            rec["members"][m["origin"]]["trial"],
            m["member"],
            m["trial_id"],
            metric,
            m["last"][metric],
            {**rec["bases"][m["origin"]], **{key: m["last"][key] for key in s["mutate"]}},
            m["lineage"].get("schedule", []),
        )
        for m in done[: k - 1]
    ]


def _replayed(trial: dict, member: int, trial_id: str, metric: str, value: float, config: dict, schedule: list) -> dict:
    """A PBT member as the final stage retrains it: the study trial its weights descend from (number), the
    member's config at the end and its schedule {epoch: values}."""
    return {
        "number": trial["number"],
        "ray_trial_id": trial_id,
        "metric": metric,
        "value": value,
        "epoch": config["epochs"],
        "params": {**trial["params"], "pbt_member": member},
        "config": config,
        "schedule": {int(first): values for first, values in schedule},
        "epochs": config["epochs"],
    }
