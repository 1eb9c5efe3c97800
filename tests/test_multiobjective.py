"""Multi-objective studies: accuracy against a model's cost (fer_tune.cost) as a Pareto front."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import SPACE, fer_tune, kill_at_pause, pausing, read_csv, study_trials, write_space

from fer_tune.common import FerTuneError
from fer_tune.config import TrainConfig
from fer_tune.cost import count_mflops, model_cost
from fer_tune.train import build_model
from fer_tune.tune.study.spaces import parse_space

CPU = torch.device("cpu")


def _space(**changes):
    return parse_space({**SPACE, **changes}, source="t.yaml")


def test_objectives_are_lists_of_metrics_and_modes():
    spec = _space(metric=["val_acc", "mflops", "latency_ms"], mode=["max", "min", "min"])
    assert spec.multi and spec.metric == "val_acc" and spec.mode == "max"
    assert spec.to_dict()["metrics"] == ["val_acc", "mflops", "latency_ms"]
    assert not _space().multi and _space().to_dict()["metrics"] == ["val_acc"]
    assert not _space(metric=["val_acc"], mode=["max"]).multi
    assert _space(
        metric=["val_acc", "params"], mode=["max", "min"], sampler="nsga2"
    ).make_sampler().__class__.__name__ == ("NSGAIISampler")
    for changes, says in [
        ({"metric": ["val_acc", "mflops"], "mode": ["max"]}, "one mode per metric"),
        ({"metric": ["val_acc", "mflops"], "mode": "max"}, "mode must be a list of as many"),
        ({"metric": ["mflops", "val_acc"], "mode": ["min", "max"]}, "first objective drives early stopping"),
        ({"metric": ["val_acc", "val_acc"], "mode": ["max", "max"]}, "each objective once"),
        ({"metric": ["val_acc", "flops"], "mode": ["max", "min"]}, "metric='flops'"),
        ({"metric": ["val_acc", "mflops"], "mode": ["max", "smallest"]}, "must be max or min (one per metric)"),
        ({"metric": ["val_acc", "mflops"], "mode": ["max", "min"], "sampler": "cmaes"}, "cmaes optimises one"),
        ({"metric": [], "mode": []}, "a metric name or a list"),
    ]:
        with pytest.raises(FerTuneError, match=re.escape(says)):
            _space(**changes)


def test_cost_metrics_count_the_model_and_time_one_image():
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 40 * 40, 7))
    # 2 FLOPs per multiply-add: 40*40 positions x 4 filters x 9 taps, then a 6400 x 7 matrix product
    assert count_mflops(conv, CPU) == pytest.approx(2 * (40 * 40 * 4 * 9 + 6400 * 7) / 1e6)
    costs = {}
    for width in (0.0625, 0.125):
        model = build_model(TrainConfig.from_dict({"width": width}, source="t"), CPU)
        costs[width], again = model_cost(model, CPU, "ten", None), model_cost(model, CPU, "ten", None)
        assert (again["params"], again["mflops"]) == (costs[width]["params"], costs[width]["mflops"])  # counted
        assert again["latency_ms"] > 0 and costs[width]["latency_ms"] > 0
    # twice the channels: about four times the parameters and the FLOPs of the convolutions
    assert 3.0 < costs[0.125]["mflops"] / costs[0.0625]["mflops"] < 4.1
    assert 3.0 < costs[0.125]["params"] / costs[0.0625]["params"] < 4.1


def _dominated(a, b, modes):
    """True when row b is at least as good as a everywhere and better somewhere."""
    better = [(y > x if m == "max" else y < x) for x, y, m in zip(a, b, modes)]
    same_or_better = [(y >= x if m == "max" else y <= x) for x, y, m in zip(a, b, modes)]
    return all(same_or_better) and any(better)


def test_a_study_of_accuracy_against_flops_survives_a_kill_and_an_extend(tmp_path, env):
    space = write_space(
        tmp_path,
        metric=["val_acc", "mflops"],
        mode=["max", "min"],
        num_samples=6,
        max_epochs=4,
        early_stopping={"type": "asha", "grace_period": 2, "reduction_factor": 2},
        space={
            "width": {"type": "categorical", "choices": [0.0625, 0.125]},
            "lr": {"type": "float", "low": 3e-3, "high": 5e-2, "log": True},
        },
    )
    results = tmp_path / "results"
    sdir = results / "t"
    cmd = [sys.executable, "-m", "fer_tune.cli", "sweep", str(space), "--results", str(results), "--quiet"]
    proc = subprocess.Popen(
        [*cmd, "--num-cpus", "2"],
        env=pausing(env, tmp_path / "paused"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    kill_at_pause(proc, tmp_path / "paused", within=180)
    r = fer_tune(env, "resume", sdir, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    r = fer_tune(env, "extend", sdir, "--num-samples", 2, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pareto front (val_acc max, mflops min; completed trials): trial" in r.stdout

    trials = study_trials(sdir)
    assert len(trials) == 8 and all(t.state.is_finished() for t in trials)
    rows = {int(r["number"]): r for r in read_csv(sdir)}
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert done and all(len(t.values) == 2 for t in done)
    # no intermediate values (Optuna's samplers would read them as one objective's); the epochs' values instead
    assert not any(t.intermediate_values for t in trials)
    for t in trials:  # kept: the best epoch (where the values are from) and the last (where the study stopped it)
        assert 1 <= len(t.user_attrs["objectives"]) <= 2 and max(map(int, t.user_attrs["objectives"])) == int(
            rows[t.number]["epochs"]
        )
    for t in done:  # the values: the best val_acc and the FLOPs of the trial's width
        row = rows[t.number]
        assert t.values[0] == pytest.approx(float(row["best_val_acc"]), abs=1e-3)
        assert t.values[1] == pytest.approx(float(row["mflops"]), abs=1e-3)
    by_width = {}
    for row in rows.values():
        by_width.setdefault(row["param_width"], set()).add(row["mflops"])
    assert all(len(v) == 1 for v in by_width.values()) and len(set().union(*by_width.values())) == len(by_width)

    # the front: exactly the completed trials no other completed trial dominates
    points = {n: (float(r["best_val_acc"]), float(r["mflops"])) for n, r in rows.items() if r["state"] == "COMPLETE"}
    front = {n for n, p in points.items() if not any(_dominated(p, q, ["max", "min"]) for q in points.values())}
    assert {n for n, r in rows.items() if r["pareto"] == "yes"} == front

    r = fer_tune(env, "status", sdir)
    assert r.returncode == 0 and "front" in r.stdout and "mflops" in r.stdout and "*" in r.stdout
    s = json.loads(fer_tune(env, "status", sdir, "--json").stdout)
    assert s["objectives"] == [["val_acc", "max"], ["mflops", "min"]]
    pick = max(front, key=lambda n: points[n][0])
    assert s["best"]["number"] == pick

    # the final stage takes the front's best val_acc, and says so
    r = fer_tune(env, "final", sdir, "--epochs", 1, "--finetune-epochs", 1, "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"trial {pick} (val_acc" in r.stderr and "the Pareto front's best; another with --trial N" in r.stderr
    assert json.loads((sdir / "final" / "final.json").read_text())["trial"]["number"] == pick
    html = (sdir / "report.html").read_text()
    assert 'id="pareto-table"' in html and 'id="fig-pareto"' in html and "The final stage retrained trial" in html
