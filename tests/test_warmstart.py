"""Where a study starts: the paper's recipe as trial 0 when the space can express it, another study's best
configurations with --warm-start, nothing enqueued twice (fer_tune.tune.study.warmstart)."""

import json

import optuna
import pytest
import yaml
from conftest import SPACE, fer_tune, read_csv, study_trials

from fer_tune.common import FerTuneError
from fer_tune.config import TrainConfig
from fer_tune.tune.study.spaces import load_space, parse_space
from fer_tune.tune.study.warmstart import describe, enqueue, parse_source, plan, point_of

PAPER = TrainConfig().to_dict()


def spec_of(space: dict, **top):
    return parse_space({**SPACE, "space": space, **top}, source="test", text="", default_name="t")


def test_the_shipped_spaces_that_search_the_papers_keys_start_from_its_recipe():
    joint, _ = point_of(load_space("joint"), PAPER)
    keys = "optimizer momentum lr scheduler factor patience dropout weight_decay batch_size label_smoothing ema"
    assert joint == {k: PAPER[k] for k in keys.split()} and joint["lr"] == 0.01 and joint["patience"] == 5
    # momentum, factor and patience under their conditions; t_0 (cosine_wr only) left out
    smoke, _ = point_of(load_space("smoke"), PAPER)
    assert smoke == {"optimizer": "sgd_nesterov", "lr": 0.01, "dropout": 0.2}


@pytest.mark.parametrize(
    "space,why",
    [
        ({"optimizer": {"type": "categorical", "choices": ["adam", "sgd"]}}, "optimizer 'sgd_nesterov' is outside"),
        ({"lr": {"type": "float", "low": 0.02, "high": 0.1, "log": True}}, "lr 0.01 is outside 0.02..0.1"),
        (
            {"batch_size": {"type": "int", "low": 48, "high": 128, "step": 32}},
            "batch_size 64 is outside 48..128 step 32",
        ),
        ({"ema": {"type": "categorical", "choices": [0.99, 0.999]}}, "ema 0.0 is outside"),
    ],
)
def test_a_space_that_cannot_express_the_recipe_says_which_key(space, why):
    params, said = point_of(spec_of(space), PAPER)
    assert params is None and why in said
    warm = plan(spec_of(space), [])
    assert warm["points"] == [] and why in warm["paper"] and "no trial of the paper's recipe" in describe(warm)


def test_conditions_steps_and_parameters_named_apart_from_their_key():
    space = {
        "optimizer": {"type": "categorical", "choices": ["sgd_nesterov", "adam"]},
        "lr_sgd": {"type": "float", "low": 3e-3, "high": 0.1, "log": True, "key": "lr", "when": {"optimizer": ["sgd_nesterov"]}},
        "lr_adam": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True, "key": "lr", "when": {"optimizer": ["adam"]}},
        "batch_size": {"type": "int", "low": 32, "high": 128, "step": 32},
        "label_smoothing": {"type": "categorical", "choices": [0, 0.1]},  # 0 is the paper's 0.0
    }  # fmt: skip
    params, _ = point_of(spec_of(space), PAPER)
    assert params == {"optimizer": "sgd_nesterov", "lr_sgd": 0.01, "batch_size": 64, "label_smoothing": 0}
    adam, _ = point_of(spec_of(space), {**PAPER, "optimizer": "adam", "lr": 1e-3})
    assert adam == {"optimizer": "adam", "lr_adam": 1e-3, "batch_size": 64, "label_smoothing": 0}


def test_the_plan_honours_warm_start_none_a_grid_and_the_studys_size(tmp_path):
    assert plan(spec_of(SPACE["space"]), [])["points"] == [
        {"from": "paper", "params": {"optimizer": "sgd_nesterov", "lr": 0.01, "dropout": 0.2}}
    ]
    off = plan(spec_of(SPACE["space"], warm_start="none"), [])
    assert off["points"] == [] and off["paper"] == "warm_start: none" and describe(off).endswith("(warm_start: none)")
    grid = {"optimizer": {"type": "categorical", "choices": ["sgd_nesterov", "adam"]}}
    assert plan(spec_of(grid, sampler="grid", num_samples=2), [])["points"] == []
    with pytest.raises(FerTuneError, match="grid study runs its grid"):
        plan(spec_of(grid, sampler="grid", num_samples=2), [str(tmp_path)])
    with pytest.raises(FerTuneError, match="warm_start=.*must be paper or none"):
        spec_of(SPACE["space"], warm_start="best")
    assert parse_source("results/a") == (parse_source("results/a:4")[0], 4)
    assert parse_source("results/a:2")[1] == 2
    for bad in ("results/a:x", "results/a:0"):
        with pytest.raises(FerTuneError, match="--warm-start"):
            parse_source(bad)
    with pytest.raises(FerTuneError, match="--warm-start .*nothing: .* is not a fer-tune study"):
        plan(spec_of(SPACE["space"]), [str(tmp_path / "nothing")])


def test_enqueued_points_come_first_once():
    study = optuna.create_study(direction="maximize")
    warm = plan(spec_of(SPACE["space"]), [])
    assert enqueue(study, warm) == 1 and enqueue(study, warm) == 0  # again (a restarted sweep): nothing twice
    trial = study.ask()
    assert trial.suggest_categorical("optimizer", ["sgd_nesterov", "adam"]) == "sgd_nesterov"
    assert trial.suggest_float("lr", 1e-3, 5e-2, log=True) == 0.01 and trial.user_attrs["warm_start"] == "paper"
    assert enqueue(study, warm) == 0  # the point runs now: not queued again
    assert enqueue(study, None) == 0


def test_a_sweep_runs_the_recipe_first_and_another_studys_best_after_it(env, tmp_path, small_study):
    donor = read_csv(small_study)
    assert donor[0]["warm_start"] == "paper" and donor[0]["param_lr"] == "0.01"
    assert [r["warm_start"] for r in donor[1:]] == ["", ""]
    space = tmp_path / "t.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "num_samples": 3, "max_epochs": 1}, sort_keys=False))
    r = fer_tune(
        env, "sweep", space, "--results", tmp_path / "r", "--warm-start", str(small_study), "--num-samples", "1"
    )
    assert r.returncode == 2 and "configurations to run first and the study runs 1 trial;" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "r").exists()
    r = fer_tune(env, "sweep", space, "--results", tmp_path / "r", "--warm-start", f"{small_study}:3", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    sdir = tmp_path / "r" / "t"
    # the donor's best (all 3 when none failed): its trial 0 is the paper's recipe, queued already
    found = sum(1 for x in donor if x["best_val_acc"] != "" and x["state"] != "FAIL")
    said = f"warm start: trial 0 is the paper's recipe; {found - 1} of the {found} best of {small_study} (1 already queued)"
    assert said in r.stderr, r.stderr
    trials = study_trials(sdir)
    assert trials[0].params == {"optimizer": "sgd_nesterov", "lr": 0.01, "dropout": 0.2}
    assert trials[0].user_attrs["warm_start"] == "paper"
    donor_params = {f"t#{t.number}": t.params for t in study_trials(small_study)}
    for t in trials[1:found]:
        assert t.params == donor_params[t.user_attrs["warm_start"]] and t.user_attrs["warm_start"] != "t#0"
    rec = json.loads((sdir / "study.json").read_text())
    assert [p["from"] for p in rec["warm_start"]["points"]] == [t.user_attrs["warm_start"] for t in trials]
    # extend: the sampler's own trials, nothing enqueued again
    r = fer_tune(env, "extend", sdir, "--num-samples", "1", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    trials = study_trials(sdir)
    assert len(trials) == 4 and "warm_start" not in trials[3].user_attrs and trials[3].user_attrs["run"] == "extend-1"
