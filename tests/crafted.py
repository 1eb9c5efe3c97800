"""A study directory made by hand, without Ray or training: study.json, an Optuna sqlite database with the trials as
the study engine leaves them (parameters, per-epoch values, `ray_trial_id` and `status`) and one Tune trial
directory per trial with its result.json (per-epoch val_acc and per-emotion val recall). `fer-tune status` and
the report read it as they read a swept study."""

import json
from pathlib import Path

from conftest import SPACE as SWEPT

from fer_tune.common import EMOTIONS
from fer_tune.tune.study.spaces import parse_space

# the tests' small study, its lr searched over three decades
SPACE = {
    **SWEPT,
    "name": "crafted",
    "space": {**SWEPT["space"], "lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True}},
}
# val: 301 images; happy is the commonest emotion (77 of 301 = 25.58 %)
VAL_COUNTS = {"angry": 40, "disgust": 5, "fear": 42, "happy": 77, "sad": 50, "surprise": 33, "neutral": 54}


def one_class(emotion: str) -> dict:
    return {e: 100.0 if e == emotion else 0.0 for e in EMOTIONS}


def some_of_each(level: float) -> dict:
    return {e: level + 3 * i for i, e in enumerate(EMOTIONS)}


def trial(number, params, vals, *, recalls=None, status=None, device_seconds=30.0, mflops=1.0, warm=None) -> dict:
    """One trial: its params, val_acc per epoch (the last value stays; epochs < max_epochs: pruned) and the
    per-emotion val recall it reports at every epoch (None: none reported); `warm`: where a configuration the
    sweep ran first came from ("paper", "OTHER#N")."""
    return {
        "number": number,
        "params": params,
        "vals": vals,
        "recalls": recalls,
        "status": status,
        "device_seconds": device_seconds,
        "mflops": mflops,
        **({"warm": warm} if warm else {}),
    }


def craft_study(root: Path, trials: list[dict], *, space: dict | None = None, class_counts: bool = True) -> Path:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    raw = {**SPACE, **(space or {})}
    spec = parse_space(raw, source="crafted")
    sdir = Path(root) / raw["name"]
    (sdir / "tune").mkdir(parents=True)
    data = {
        "source": "synthetic:700",
        "protocol": "paper",
        "format": "synthetic",
        "protocol_note": "train=Training, val=PrivateTest, test=PublicTest",
        "fingerprint": "0" * 16,
        "sizes": {"train": 2000, "val": sum(VAL_COUNTS.values()), "test": 298},
    }
    if class_counts:
        data["class_counts"] = {"val": VAL_COUNTS}
    storage = optuna.storages.RDBStorage(f"sqlite:///{sdir / 'optuna.db'}")
    multi = len(spec.metrics) > 1
    study = optuna.create_study(
        study_name=raw["name"],
        storage=storage,
        directions=["maximize" if m == "max" else "minimize" for m in spec.modes],
    )
    for t in trials:
        tid = f"t{t['number']:03d}"
        full = len(t["vals"]) >= raw["max_epochs"]
        status = t["status"] or ("completed" if full else "pruned")
        state = {"completed": "COMPLETE", "pruned": "PRUNED", "diverged": "FAIL", "running": "RUNNING"}[status]
        distributions = {}
        for name in t["params"]:
            p = raw["space"][name]
            distributions[name] = (
                optuna.distributions.CategoricalDistribution(p["choices"])
                if p["type"] == "categorical"
                else optuna.distributions.FloatDistribution(p["low"], p["high"], log=p.get("log", False))
            )
        values = None
        if state == "COMPLETE":
            values = [max(t["vals"])] + ([t.get("mflops", 1.0)] if multi else [])
        study.add_trial(
            optuna.trial.create_trial(
                params=t["params"],
                distributions=distributions,
                state=getattr(optuna.trial.TrialState, state),
                values=values,
                intermediate_values={} if multi else {e + 1: v for e, v in enumerate(t["vals"])},
                user_attrs={
                    "ray_trial_id": tid,
                    "status": "" if status == "running" else status,
                    "run": "tune",
                    **({"warm_start": t["warm"]} if t.get("warm") else {}),
                    **(
                        {"objectives": {str(e + 1): [v, t.get("mflops", 1.0)] for e, v in enumerate(t["vals"])}}
                        if multi
                        else {}
                    ),
                },
            )
        )
        tdir = sdir / "tune" / f"trial_{tid}"
        tdir.mkdir()
        lines = []
        for e, v in enumerate(t["vals"], 1):
            row = {
                "trial_id": tid,
                "epoch": e,
                "training_iteration": e,
                "val_acc": v,
                "val_loss": round(2.0 - v / 50, 4),
                "best_val_acc": max(t["vals"][:e]),
                "epoch_seconds": t["device_seconds"] / len(t["vals"]),
                "device_seconds": t["device_seconds"] * e / len(t["vals"]),
                "node": "n1",
                "status": "diverged" if status == "diverged" and e == len(t["vals"]) else "running",
            }
            if multi:
                row["mflops"] = t.get("mflops", 1.0)
            if t["recalls"] is not None:
                row.update({f"val_recall_{k}": r for k, r in t["recalls"].items()})
            lines.append(json.dumps(row))
        (tdir / "result.json").write_text("\n".join(lines) + "\n")
    record = {
        "name": raw["name"],
        "space_file": "crafted.yaml",
        "spec": spec.to_dict(),
        "overrides": {},
        "data": data,
        "storage": "sqlite:///optuna.db",
        "ray_storage": None,
        "optuna_study": raw["name"],
        "fingerprint": {},
        "created": "2026-12-01 10:00:00",
        "runs": [{"dir": "tune", "num_samples": len(trials), "seed": 0, "max_concurrent": None, "wall_seconds": 600}],
    }
    (sdir / "study.json").write_text(json.dumps(record))
    return sdir
