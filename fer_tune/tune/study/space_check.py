"""`fer-tune space check`: a search space validated and compiled without running a trial: its parameters and
conditions, the grid, sample trial configs, the epoch budget (worst case and what ASHA should leave of it), the
resources per trial and how many trials run at once on this machine (no Ray started) or a Ray cluster."""

from __future__ import annotations

import textwrap
from typing import Any

from ..runtime.preflight import alive_nodes, local_machine, trials_at_once
from ..runtime.session import ray_session
from .record import optuna_lib
from .spec import StudySpec
from .warmstart import describe, plan

SAMPLED_TRIALS = 64  # random trials whose TrainConfig is built: a combination fit() would refuse shows up here


def sample_configs(spec: StudySpec, n: int = SAMPLED_TRIALS) -> list[Any]:
    """The TrainConfigs of `n` random trials of the space (FerTuneError for an invalid combination)."""
    optuna = optuna_lib()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.seed), direction="maximize")
    define, out = spec.define_by_run(), []
    for _ in range(n):
        trial = study.ask()
        constants = define(trial)
        out.append(spec.trial_config({**trial.params, **constants}))
        study.tell(trial, 0.0)
    return out


def capacity(spec: StudySpec, address: str | None, num_cpus: int | None) -> dict:
    """Where the trials would run and how many at once: this machine (counted, no Ray) or the cluster's nodes."""
    if address is None:
        nodes = [local_machine(num_cpus)]
        where = f"this machine ({nodes[0]['CPU']} CPU, {nodes[0]['GPU']} GPU)"
    else:
        with ray_session(address, num_cpus=None, output="quiet"):
            nodes = [{"CPU": n["Resources"].get("CPU", 0), "GPU": n["Resources"].get("GPU", 0)} for n in alive_nodes()]
        where = (
            f"the Ray cluster at {address} ({len(nodes)} node(s), {sum(n['CPU'] for n in nodes):g} CPU, "
            f"{sum(n['GPU'] for n in nodes):g} GPU)"
        )
    return {"where": where, "nodes": nodes, "at_once": trials_at_once(spec.resources, nodes)}


def _values(p: Any) -> str:
    if p.type == "categorical":
        text = ", ".join(map(str, p.choices))
    elif p.type == "fixed":
        text = str(p.value)
    else:
        text = f"{p.low} .. {p.high}" + (" (log)" if p.log else "") + (f" step {p.step}" if p.step else "")
    if p.when:
        text += "  when " + "; ".join(f"{k} in [{', '.join(map(str, v))}]" for k, v in p.when.items())
    if p.key != p.name:
        text += f"  (sets {p.key})"
    return text


def report(spec: StudySpec, cap: dict, data: Any | None, required: bool) -> dict:
    """Everything `space check` prints, as data (its --json)."""
    budget = spec.epoch_budget()
    configs = sample_configs(spec)
    return {
        "name": spec.name,
        "source": spec.source,
        "description": spec.description.strip(),
        "metric": spec.metric,
        "mode": spec.mode,
        "objectives": list(zip(spec.metrics, spec.modes, strict=True)),
        "sampler": spec.sampler,
        "seed": spec.seed,
        "early_stopping": spec.early_stopping,
        "parameters": {p.name: {**p.to_dict(), "text": _values(p)} for p in spec.space.values()},
        "fixed": spec.fixed,
        "grid_size": spec.grid_size() if spec.sampler == "grid" else None,
        "warm_start": describe(plan(spec, [])),
        "num_samples": spec.num_samples,
        "max_epochs": spec.max_epochs,
        "epoch_budget": budget,
        "sampled_configs": len(configs),
        "resources": spec.resources,
        "capacity": cap,
        "data": data.describe() if data is not None else None,
        "data_required": required,
    }


def report_lines(r: dict) -> list[str]:
    es = r["early_stopping"]
    b = r["epoch_budget"]
    if es["type"] == "asha":
        rungs = ", ".join(map(str, b["rungs"])) or "none below max_epochs"
        expected = (
            f"; ASHA expects about {b['expected']:.0f} (its rungs at epoch {rungs} keep 1/"
            f"{es['reduction_factor']:g} of the trials each; the first trials, with few peers at a rung, go on "
            "more often)"
        )
    elif es["type"] == "median":
        expected = "; median stopping ends weak trials after the grace period, by how many depends on the results"
    else:
        expected = " (no early stopping: every trial runs them all)"
    res = r["resources"]
    cap = r["capacity"]
    lines = [
        f"{r['source']}: a valid space, study {r['name']}",
        *textwrap.wrap(r["description"], 112, initial_indent="  ", subsequent_indent="  "),
        (
            f"metric {r['metric']} ({r['mode']})"
            if len(r["objectives"]) == 1
            else "objectives " + ", ".join(f"{m} ({mode})" for m, mode in r["objectives"]) + " (a Pareto front)"
        )
        + f"; sampler {r['sampler']} (seed {r['seed']}); early stopping "
        + ", ".join(
            [es["type"] + (f" by {r['metric']}" if len(r["objectives"]) > 1 and es["type"] != "none" else "")]
            + [f"{k} {v}" for k, v in es.items() if k != "type"]
        ),
        f"parameters ({len(r['parameters'])}):",
    ]
    width = max((len(n) for n in r["parameters"]), default=0)
    lines += [f"  {n:<{width}}  {p['type']:<11}  {p['text']}" for n, p in r["parameters"].items()]
    if r["fixed"]:
        lines.append("fixed: " + ", ".join(f"{k}={v}" for k, v in r["fixed"].items()))
    if r["grid_size"] is not None:
        lines.append(f"grid: {r['grid_size']} points")
    if r.get("warm_start"):
        lines.append(r["warm_start"])
    lines += [
        f"trials: {r['num_samples']} of at most {r['max_epochs']} epochs; {r['sampled_configs']} sampled trial "
        "configs are valid training configs",
        f"epoch budget: at most {b['worst']} trial-epochs{expected}",
        f"resources per trial: {res['cpu']:g} CPU, {res['gpu']:g} GPU; on {cap['where']}: "
        + (
            f"{cap['at_once']} trial(s) at once"
            if cap["at_once"]
            else "none fits (a local Ray refuses such a study; pass --cpus-per-trial / --gpus-per-trial to sweep)"
        ),
    ]
    if r["data"] is not None:
        d = r["data"]
        sizes = ", ".join(f"{k} {v:,}" for k, v in d["sizes"].items())
        lines.append(f"data: {d['source']} ({d['format']}; {sizes}), protocol {d['protocol']}")
    elif r["data_required"]:
        lines.append("data: the space needs --data PATH (FER2013's fer2013.csv or its Kaggle image folders)")
    return lines
