"""The decision summary: what a study found and how sure it is, as facts (numbers, JSON-able) and as sentences that
the report shows first and `fer-tune status` prints.

- the winner's validation score with a 95 % Wilson score interval (Wilson 1927) on the val split's size;
- ties: every other trial whose best score lies inside that interval (a difference the val split cannot resolve);
- the final stage's test top-1 with its Wilson interval on the test split's size and its spread over seeds, and a
  baseline's difference with Newcombe's hybrid score interval (Newcombe 1998, method 10);
- collapsed trials (one emotion predicted for every face, or a score at or below the majority-class rate) and a
  setting they share that no healthy trial has;
- the winner's parameters at the edge of their searched range; the cost; the next command.

Only the study's files are read (the caller hands them over): no Ray, no Optuna.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..common import EMOTIONS
from ..recipe import MODELS
from .final_figures import MODEL_LABEL
from .guides import CHANCE_PCT

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
EDGE = 0.05  # a parameter within this share of its range (log scale where searched on one) sits at the edge
ONE_CLASS_OTHERS = 1.0  # recall % every other emotion stays below when a model predicts one emotion
INTERVAL = "95 % Wilson score interval"
TIE_RULE = (
    "a tie is a trial that did not collapse whose best score lies inside the winner's 95 % Wilson score interval "
    "on the val split's size: the split is too small to tell the two apart"
)


def wilson(pct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy `pct` (%) measured on `n` images, in %."""
    p = min(max(pct / 100.0, 0.0), 1.0)
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def newcombe(pct1: float, n1: int, pct2: float, n2: int) -> tuple[float, float]:
    """Newcombe's hybrid score interval for the difference pct1 - pct2 of two accuracies (%), built from their
    Wilson intervals; for two models tested on the same images it is conservative (wider than a paired one)."""
    lo1, hi1 = wilson(pct1, n1)
    lo2, hi2 = wilson(pct2, n2)
    d = pct1 - pct2
    return d - math.hypot(pct1 - lo1, hi2 - pct2), d + math.hypot(hi1 - pct1, pct2 - lo2)


def _is_accuracy(metric: str) -> bool:
    return metric.endswith("acc")


def _value(r: dict, key: str) -> float | None:
    try:
        return float(r[key]) if r.get(key, "") != "" else None
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------
# the facts
# ---------------------------------------------------------------------------------------------------------
def decide(sdir: str | Path, record: dict, summary: dict, results: dict, final: dict | None) -> dict:
    """The summary's facts from a study's record, its status_summary(), its trials' per-epoch results {ray trial
    id: [result, ...]} and its final stage (fer_tune.report.final.load_final, None without one)."""
    spec, data = record["spec"], record.get("data", {})
    metric, mode = spec["metric"], spec["mode"]
    key = f"best_{metric}"
    n_val = int(data.get("sizes", {}).get("val", 0) or 0)
    accuracy = _is_accuracy(metric) and n_val > 0
    rows = summary["rows"]
    scored = [r for r in rows if _value(r, key) is not None and r["state"] != "FAIL"]
    best = summary["best"]
    out: dict = {
        "metric": metric,
        "mode": mode,
        "objectives": [list(o) for o in summary.get("objectives", [[metric, mode]])],
        "val_images": n_val,
        "interval_method": INTERVAL if accuracy else None,
        "tie_rule": TIE_RULE if accuracy else None,
        "trials_scored": len(scored),
        "winner": None,
        "runner_up": None,
        "ties": [],
    }
    if best is not None:
        value = float(best[key])
        out["winner"] = {
            "trial": best["number"],
            "value": value,
            "epoch": best["best_epoch"],
            "status": best["status"],
            "epochs": int(best["epochs"] or 0),
            "interval": list(wilson(value, n_val)) if accuracy else None,
            "params": {k[6:]: v for k, v in best.items() if k.startswith("param_") and v != ""},
        }
        others = sorted(
            (r for r in scored if r["number"] != best["number"]), key=lambda r: float(r[key]) * (mode == "max" or -1)
        )
        if others:  # the next best value, and every trial that has it (the first of them named alone)
            top = float(others[-1][key])
            same = sorted(r["number"] for r in others if float(r[key]) == top)
            out["runner_up"] = {"trial": same[0], "value": top, **({"tied": same} if len(same) > 1 else {})}
    out.update(_collapse(spec, data, scored, results, key) if _is_accuracy(metric) else _no_collapse())
    if best is not None and accuracy:
        lo, hi = out["winner"]["interval"]
        bad = {c["trial"] for c in out["collapsed"]}
        out["ties"] = [
            {"trial": r["number"], "value": float(r[key]), "status": r["status"], "epochs": int(r["epochs"] or 0)}
            for r in sorted(scored, key=lambda r: -float(r[key]))
            if r["number"] != best["number"] and r["number"] not in bad and lo <= float(r[key]) <= hi
        ]
        # the winner's interval reaches the majority-class rate: not shown to beat predicting the commonest emotion
        out["winner"]["above_majority"] = None if out["majority"] is None else lo > out["majority"]["pct"]
    out["warm_start"] = [  # the configurations the sweep ran first (fer_tune.tune.study.warmstart)
        {"trial": r["number"], "from": r["warm_start"], "value": _value(r, key), "status": r["status"]}
        for r in rows
        if r.get("warm_start")
    ]
    out["edges"] = _edges(spec, out["winner"]["params"] if out["winner"] else {})
    out["final"] = _final(final, summary.get("running", {}))
    runs = record.get("runs", [])
    out["cost"] = {
        "device_hours": summary["device_hours"],
        "final_device_hours": (out["final"] or {}).get("device_hours"),
        "epochs_trained": summary["epochs_trained"],
        "epoch_budget": summary["num_samples"] * int(spec["max_epochs"]),
        "wall_seconds": round(sum(r.get("wall_seconds", 0.0) for r in runs), 1),
    }
    report = Path(sdir) / "report.html"
    out["report"] = str(report.resolve()) if report.is_file() else None
    out["unread"] = {"trials": summary["unread"], "where": summary["experiments"]} if summary.get("unread") else None
    out["next"] = _next(Path(sdir), summary, out["final"])
    return out


def _no_collapse() -> dict:
    return {"chance": None, "majority": None, "collapsed": [], "collapsed_setting": [], "collapse_checked": False}


def _collapse(spec: dict, data: dict, scored: list[dict], results: dict, key: str) -> dict:
    """Trials that learnt nothing: one emotion predicted for every val face (recall ~0 for every other emotion at
    the best epoch), or a best score at or below the majority-class rate (what predicting the commonest emotion
    scores)."""
    predicts: dict[int, str] = {}
    for r in scored:
        at = {x.get("epoch"): x for x in results.get(r["ray_trial_id"], [])}.get(r["best_epoch"], {})
        recalls = {e: at.get(f"val_recall_{e}") for e in EMOTIONS}
        if any(v is None for v in recalls.values()):
            continue
        top = max(recalls, key=lambda e: recalls[e])
        if all(v < ONE_CLASS_OTHERS for e, v in recalls.items() if e != top):
            predicts[r["number"]] = top
    counts = data.get("class_counts", {}).get("val")
    majority = None
    if counts and sum(counts.values()):
        name = max(counts, key=lambda e: counts[e])
        majority = {"class": name, "pct": 100.0 * counts[name] / sum(counts.values()), "recorded": True}
    elif predicts:  # a one-emotion model scores that emotion's share: the majority rate is at least the largest
        r = max((r for r in scored if r["number"] in predicts), key=lambda r: float(r[key]))
        majority = {"class": predicts[r["number"]], "pct": float(r[key]), "recorded": False}
    collapsed = []
    for r in scored:
        low = majority is not None and float(r[key]) <= majority["pct"] + 0.005
        if r["number"] in predicts or low:
            collapsed.append(
                {"trial": r["number"], "value": float(r[key]), "predicts": predicts.get(r["number"]), "low": low}
            )
    bad = {c["trial"] for c in collapsed}
    setting = shared_setting(
        spec["space"], [r for r in scored if r["number"] in bad], [r for r in scored if r["number"] not in bad]
    )
    return {
        "chance": CHANCE_PCT,
        "majority": majority,
        "collapsed": collapsed,
        "collapsed_setting": setting,
        "collapse_checked": bool(predicts) or any(_has_recalls(results.get(r["ray_trial_id"], [])) for r in scored),
    }


def _has_recalls(res: list[dict]) -> bool:
    return any(f"val_recall_{EMOTIONS[0]}" in x for x in res)


def shared_setting(space: dict, bad: list[dict], good: list[dict]) -> list[str]:
    """Settings every trial of `bad` has and no trial of `good` has, as `lr >= 0.012` or `optimizer = adam`
    (nothing from a single trial, or when every trial is bad: nothing tells them apart)."""
    if len(bad) < 2 or not good:
        return []
    out = []
    for name, p in space.items():
        col = f"param_{name}"
        if any(r.get(col, "") == "" for r in bad):
            continue
        have = [r[col] for r in good if r.get(col, "") != ""]
        if p["type"] in ("float", "int"):
            b, g = [float(r[col]) for r in bad], [float(v) for v in have]
            if g and min(b) > max(g):
                out.append(f"{name} >= {min(b):.3g}")
            elif g and max(b) < min(g):
                out.append(f"{name} <= {max(b):.3g}")
        elif p["type"] == "categorical":
            values = {str(r[col]) for r in bad}
            if len(values) == 1 and next(iter(values)) not in {str(v) for v in have}:
                out.append(f"{name} = {next(iter(values))}")
    return out


def _edges(spec: dict, params: dict) -> list[dict]:
    """The winner's numeric parameters within EDGE of either end of their searched range."""
    out = []
    for name, p in spec["space"].items():
        if p["type"] not in ("float", "int") or params.get(name, "") == "" or p.get("high") == p.get("low"):
            continue
        lo, hi, v = float(p["low"]), float(p["high"]), float(params[name])
        log = bool(p.get("log")) and lo > 0 and v > 0
        f = (lambda x: math.log(x)) if log else (lambda x: x)
        pos = (f(v) - f(lo)) / (f(hi) - f(lo))
        if pos <= EDGE or pos >= 1 - EDGE:
            side = "low" if pos <= EDGE else "high"
            out.append({"param": name, "value": v, "low": lo, "high": hi, "log": log, "side": side})
    return out


def _final(final: dict | None, running: dict) -> dict | None:
    """The final stage's test top-1 (the exported model's: the fine-tuned one where the stage fine-tunes) with its
    interval on the test split's size, its spread over seeds, and a baseline's difference."""
    if final is None:
        return None
    m, info = final.get("metrics"), final.get("info") or {}
    out: dict = {"dir": str(final["dir"]), "state": "running" if "final" in running else "unfinished"}
    if not m:
        return out
    ok = [s for s in m.get("seeds", []) if s.get("status", "complete") == "complete" and "models" in s]
    agg = m.get("aggregate") or {}
    out["state"] = "complete" if m.get("status") == "complete" else "partial"
    out["device_hours"] = m.get("device_hours")
    out["seeds_failed"] = [s["seed"] for s in m.get("seeds", []) if s not in ok]
    model = next((n for n in reversed(MODELS) if n in agg), None)
    if model is None or not ok:
        return out
    top1 = agg[model]["top1"]
    n_test = _images(ok[0]["models"][model])
    out.update(
        model=model,
        model_label=MODEL_LABEL[model],
        top1=top1["mean"],
        seeds=list(top1["values"]),
        std=top1["std"] if len(top1["values"]) > 1 else None,
        test_images=n_test,
        interval=list(wilson(top1["mean"], n_test)) if n_test else None,
        trial=(info.get("trial") or m.get("trial") or {}).get("number"),
        others={n: agg[n]["top1"]["mean"] for n in MODELS if n in agg and n != model},
    )
    b = m.get("baseline")
    if b and model in b.get("difference", {}) and model in b.get("aggregate", {}):
        base = b["aggregate"][model]["top1"]
        diff = b["difference"][model]["top1"]
        both = b.get("difference_seeds") or sorted(s["seed"] for s in ok)
        per_seed = [
            w["models"][model]["top1"] - x["models"][model]["top1"]
            for w in ok
            for x in b.get("seeds", [])
            if w["seed"] == x["seed"] and w["seed"] in both and "models" in x
        ]
        out["baseline"] = {
            "name": b["name"],
            "top1": base["mean"],
            "difference": diff,
            "interval": list(newcombe(top1["mean"], n_test, base["mean"], n_test)) if n_test else None,
            "per_seed": per_seed,
        }
    e = m.get("ensemble") or {}
    if e.get("aggregate") and n_test:  # an ensemble stage: the ensemble against member 1, validation's pick alone
        ens, member = e["aggregate"]["top1"], e["members"][0]["aggregate"].get("top1")
        out["ensemble"] = {
            "members": [x["trial"]["number"] for x in e["members"]],
            "top1": ens["mean"],
            "std": ens["std"] if len(ens["values"]) > 1 else None,
            "interval": list(wilson(ens["mean"], n_test)),
            "difference": (e.get("difference") or {}).get("top1"),
            "difference_interval": list(newcombe(ens["mean"], n_test, member["mean"], n_test)) if member else None,
        }
    return out


def _images(model_metrics: dict) -> int:
    """How many test images a model was measured on (the sum of its confusion matrix)."""
    return int(sum(sum(row) for row in model_metrics.get("confusion") or []))


def _next(sdir: Path, s: dict, final: dict | None) -> str:
    """The one command that moves the study on."""
    if "study" in s["running"]:
        return f"fer-tune status {sdir}"
    if s.get("unread"):  # nothing moves it on until its trials' results are back
        return f"fer-tune status {sdir}, once the trials' results are back in {s['experiments'][0]}"
    unfinished = [r for r in s["rows"] if r["state"] not in ("COMPLETE", "PRUNED", "FAIL")]
    if s["finished"] < s["num_samples"] or unfinished:
        return f"fer-tune resume {sdir}"
    if s["best"] is None:
        return f"fer-tune extend {sdir} --num-samples N"
    if final is None:
        return f"fer-tune final {sdir}"
    if final["state"] == "running":
        return f"fer-tune status {sdir}"
    if final["state"] == "unfinished":
        return f"fer-tune final {sdir}"
    return f"fer-tune predict {sdir / 'final'} IMAGE"
