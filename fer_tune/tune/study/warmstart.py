"""Where a study starts: the paper's recipe as its first trial, and the best configurations of earlier studies.

A study whose space can express the paper's configuration (Khaireddin & Chen 2021: TrainConfig's defaults for
the keys the space searches; the space's fixed keys and max_epochs stay the study's) runs it first, so that at
the same budget the study's best is never below what that recipe reached in it. `warm_start: none` in a space turns
that off; a grid study has none (its grid is its design). `fer-tune sweep SPACE --warm-start results/OTHER[:K]`
also runs another study's K best distinct configurations (by that study's metric) that this space can express,
saying how many it could not.

Each point goes into the Optuna study as an enqueued trial (Optuna's enqueue_trial, skipped when the study holds
a trial with the same parameters) before the sampler suggests any; its user attribute `warm_start` says where
it came from ("paper", or "OTHER#12"). The points are chosen once, by `sweep`, and kept in study.json; the
sweep's first Tune run enqueues them (again after a driver killed before Tune saved a state: nothing twice). A
resume or an extend enqueues nothing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ...common import FerTuneError
from ...config import TrainConfig
from .spec import Param, StudySpec

PAPER = "paper"
NONE = "none"
DEFAULT_K = 4


def point_of(spec: StudySpec, values: dict) -> tuple[dict | None, str]:
    """({parameter name: value}, "") for the training config `values` as this space's parameters (the keys it
    searches, under their conditions), or (None, why not) when one of them lies outside the space."""
    chosen: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    for p in spec.space.values():
        if any(chosen.get(k, constants.get(k)) not in vals for k, vals in p.when.items()):
            continue
        if p.type == "fixed":
            constants[p.name] = p.value
            continue
        if p.key not in values:
            return None, f"{p.key} is not set"
        fit = _fits(p, values[p.key])
        if fit is None:
            return None, f"{p.key} {values[p.key]!r} is outside {_domain(p)}"
        chosen[p.name] = fit
    return chosen, ""


def point_key(params: dict) -> tuple:
    """A point's parameters as a hashable key (two points alike have one key)."""
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _fits(p: Param, v: Any) -> Any:
    """`v` as parameter `p` takes it (the choice itself, a float, an int), or None when outside its domain."""
    if p.type == "categorical":
        return next((c for c in p.choices if c == v and isinstance(c, bool) == isinstance(v, bool)), None)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    tol = 1e-9 * max(1.0, abs(float(p.high)))
    if not p.low - tol <= v <= p.high + tol:
        return None
    if p.step:
        k = (v - p.low) / p.step
        if abs(k - round(k)) > 1e-6:
            return None
    if p.type == "int":
        return int(v) if float(v).is_integer() else None
    return float(min(max(v, p.low), p.high))


def _domain(p: Param) -> str:
    if p.type == "categorical":
        return "{" + ", ".join(map(str, p.choices)) + "}"
    return f"{p.low:g}..{p.high:g}" + (f" step {p.step:g}" if p.step else "")


def parse_source(text: str) -> tuple[Path, int]:
    """'results/OTHER' or 'results/OTHER:K' -> (the study directory, K); FerTuneError for a bad K."""
    path, sep, k = text.rpartition(":")
    if not sep or "/" in k or not k:
        return Path(text), DEFAULT_K
    try:
        n = int(k)
    except ValueError:
        raise FerTuneError(f"--warm-start {text}: K must be a whole number (results/OTHER:K)") from None
    if n < 1:
        raise FerTuneError(f"--warm-start {text}: K must be >= 1")
    return Path(path), n


def best_configs(sdir: Path, record: dict, spec: StudySpec, k: int) -> list[dict]:
    """The study's K best distinct configurations (fewer when it has fewer): its trials that reported its metric
    (of a multi-objective study, those on the Pareto front), best first by the (first) metric, a configuration
    tried twice taken once; each as best_trial gives it (number, value, params, full config)."""
    from .outputs import best_trial, finalists, trials_table

    table = trials_table(sdir, record)  # read once for all K
    rows = finalists(table, spec.to_dict())
    out: list[dict] = []
    seen: set = set()
    for r in rows:
        if len(out) == k:
            break
        best = best_trial(sdir, record, spec, int(r["number"]), rows=table)
        if point_key(best["params"]) not in seen:
            seen.add(point_key(best["params"]))
            out.append(best)
    return out


def plan(spec: StudySpec, sources: list[str]) -> dict:
    """What a new study enqueues: {"points": [{"from", "params", "value"?}, ...], "paper": "" or why not,
    "donors": [{"study", "asked", "taken", "outside"}]}; FerTuneError for a source that is not a readable study."""
    from .record import read_study, study_spec

    points: list[dict] = []
    seen: set = set()

    def add(params: dict, **about: Any) -> bool:
        key = point_key(params)
        if key in seen:
            return False
        seen.add(key)
        points.append({**about, "params": params})
        return True

    out: dict[str, Any] = {"paper": "", "donors": []}
    if spec.warm_start == NONE:
        out["paper"] = "warm_start: none"
    elif spec.sampler == "grid":
        out["paper"] = "a grid study runs its grid"
    else:
        params, why = point_of(spec, TrainConfig().to_dict())
        if params is None:
            out["paper"] = why
        else:
            add(params, **{"from": PAPER})
    for text in sources:
        if spec.sampler == "grid":
            raise FerTuneError("--warm-start: a grid study runs its grid; give the other study's values as choices")
        sdir, k = parse_source(text)
        try:
            record = read_study(sdir)
            donor = study_spec(sdir, record)
            best = best_configs(sdir.resolve(), record, donor, k)
        except FerTuneError as exc:
            raise FerTuneError(f"--warm-start {text}: {exc}") from None
        if not best:
            raise FerTuneError(f"--warm-start {text}: the study has no trial with a {donor.metric} yet")
        taken = outside = 0
        for t in best:
            params, _ = point_of(spec, t["config"])
            if params is None:
                outside += 1
            elif add(params, **{"from": f"{record['name']}#{t['number']}", "value": t["value"]}):
                taken += 1
        out["donors"].append(
            {
                "study": str(sdir),
                "found": len(best),
                "taken": taken,
                "outside": outside,
                "same": len(best) - taken - outside,
            }
        )
    if len(points) > spec.num_samples:
        raise FerTuneError(
            f"--warm-start: {len(points)} configurations to run first and the study runs {spec.num_samples} "
            f"trial{'s' if spec.num_samples != 1 else ''}; "
            "give a smaller K (results/OTHER:K) or a larger --num-samples"
        )
    return {**out, "points": points}


def enqueue(study: Any, warm: dict | None) -> int:
    """The plan's points as the Optuna study's next trials (those it does not hold yet); how many were added."""
    if not warm:
        return 0
    n = len(study.get_trials(deepcopy=False))
    for p in warm["points"]:
        study.enqueue_trial(p["params"], user_attrs={"warm_start": p["from"]}, skip_if_exists=True)
    return len(study.get_trials(deepcopy=False)) - n


def describe(warm: dict | None) -> str:
    """One line for the sweep's start and `status`: what the study began with."""
    if not warm:
        return ""
    parts = []
    first = warm["points"][0]["from"] if warm["points"] else ""
    if first == PAPER:
        parts.append("trial 0 is the paper's recipe")
    elif warm.get("paper"):
        parts.append(f"no trial of the paper's recipe ({warm['paper']})")
    for d in warm["donors"]:
        s = f"{d['taken']} of the {d['found']} best of {d['study']}"
        left = [f"{d['outside']} outside this space"] if d["outside"] else []
        left += [f"{d['same']} already queued"] if d.get("same") else []
        parts.append(s + (f" ({', '.join(left)})" if left else ""))
    return "warm start: " + "; ".join(parts) if parts else ""
