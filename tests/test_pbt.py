"""Population-based training seeded by a study: the schedule fit() follows (a mutation takes effect in a continued
run, a member's lineage replays bit for bit), and `fer-tune pbt` / `final --from-pbt` / `status` / `report` run as
the user runs them (CLI subprocesses over a real tiny study)."""

import csv
import json
import os
import re
import shutil
import subprocess
import time

import pytest
import torch
from conftest import cli_args, fer_tune, kill_at_pause, pausing

from fer_tune import data as fdata
from fer_tune.common import FerTuneError
from fer_tune.config import TrainConfig
from fer_tune.schedule import check_schedule
from fer_tune.train import fit
from fer_tune.tune.pbt.trial import continued

CPU = torch.device("cpu")
TINY = dict(width=0.0625, train_crops="one", test_crops="center", batch_size=32, scheduler="constant", threads=1)
KEYS = ("lr", "weight_decay", "dropout")


@pytest.fixture(scope="module")
def small():
    return fdata.load("synthetic:400", "paper")


def _states(cfg, data, **kw):
    states = {}
    res = fit(cfg, data, device=CPU, on_epoch=lambda m, take: states.__setitem__(m["epoch"], take()), **kw)
    return res, states


def _same_weights(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_clone_goes_on_with_its_new_values_and_its_lineage_replays_bit_for_bit(small):
    donor_cfg = TrainConfig(**TINY, epochs=2, lr=0.01, dropout=0.2, weight_decay=1e-4)
    _, donor = _states(donor_cfg, small)
    # member "b" takes the donor's epoch-2 weights with perturbed values (as PBT's exploit + explore does)
    new = {"lr": 0.03, "weight_decay": 5e-4, "dropout": 0.45}
    lineage = {"trial_id": "a", "origin": 0, "schedule": [[1, {k: getattr(donor_cfg, k) for k in KEYS}]], "clones": []}
    lin, plan, since = continued(donor[2], lineage, "b", new, 0, 4)
    assert since == "a@2" and plan == {3: new}
    assert lin["schedule"] == [[1, lineage["schedule"][0][1]], [3, new]]
    assert lin["clones"] == [
        {
            "epoch": 2,
            "from": "a",
            "into": "b",
            "old": lineage["schedule"][0][1],
            "new": new,
            "value": donor[2]["history"][-1]["val_acc"],
        }
    ]
    cfg = donor_cfg.replace(epochs=4, **new)
    clone, states = _states(cfg, small, checkpoint=donor[2], schedule=plan)
    assert [h["lr"] for h in clone.history] == [0.01, 0.01, 0.03, 0.03]  # the restored optimizer got the new lr
    opt = states[3]["optimizer"]["param_groups"][0]
    assert opt["lr"] == 0.03 and opt["weight_decay"] == 5e-4 and states[3]["config"]["dropout"] == 0.45
    # without the schedule the restored optimizer would keep the donor's lr: the mutation would not take effect
    stale, _ = _states(cfg, small, checkpoint=donor[2])
    assert [h["lr"] for h in stale.history][2:] == [0.01, 0.01]
    # the lineage's schedule from scratch: the same weights (dropout set on the layers = built with it)
    replay, _ = _states(cfg, small, schedule={first: v for first, v in lin["schedule"]})
    assert [h["val_acc"] for h in replay.history] == [h["val_acc"] for h in clone.history]
    assert _same_weights(replay.checkpoint, clone.checkpoint)
    # the clone continues from its own checkpoint after a restart: nothing changes, nothing is added
    lin2, plan2, since2 = continued(states[3], {**lin, "trial_id": "b", "since": since}, "b", new, 0, 4)
    assert plan2 is None and since2 == "a@2" and lin2["schedule"] == lin["schedule"] and len(lin2["clones"]) == 1
    # a clone at the last epoch has nothing left to train with its values: recorded, no segment
    lin3, plan3, _ = continued(states[4], {**lin, "trial_id": "b"}, "c", {**new, "lr": 0.05}, 0, 4)
    assert plan3 is None and lin3["schedule"] == lin["schedule"] and lin3["clones"][-1]["into"] == "c"


def test_weight_decay_schedule_spares_the_undecayed_group_and_a_resume_keeps_the_values(small):
    cfg = TrainConfig(**TINY, epochs=3, no_wd_1d=True)
    plan = {2: {"weight_decay": 3e-3, "dropout": 0.4}}
    full, states = _states(cfg, small, schedule=plan)
    groups = states[2]["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [3e-3, 0.0]
    resumed, _ = _states(cfg, small, checkpoint=states[2], schedule=plan)  # epoch 3 rebuilt: dropout 0.4 again
    assert _same_weights(resumed.checkpoint, full.checkpoint) and resumed.checkpoint["config"]["dropout"] == 0.4


@pytest.mark.parametrize(
    "schedule,cfg,says",
    [
        ({2: {"momentum": 0.5}}, {}, "momentum cannot change during a run"),
        ({9: {"lr": 0.1}}, {}, "epoch 9 is outside the run's epochs 1..3"),
        ({2: {"lr": 0.1}}, {"scheduler": "rlrp"}, "set scheduler=constant"),
        ({2: {"dropout": 1.5}}, {}, "dropout must be in [0, 1)"),
        ({"x": {"lr": 0.1}}, {}, "epoch 'x' is not a whole number"),
    ],
)
def test_bad_schedules_are_refused(schedule, cfg, says):
    with pytest.raises(FerTuneError) as exc:
        check_schedule(schedule, TrainConfig(**{**TINY, **cfg, "epochs": 3}))
    assert says in str(exc.value)


# ---------------------------------------------------------------------------------------------------------
# the commands, over a real tiny study
# ---------------------------------------------------------------------------------------------------------
# synchronous: the bottom member clones the top one at every interval, whatever order the results arrive in
FAST = ["--top-k", "2", "--population", "4", "--epochs", "4", "--interval", "1", "--synch", "--quiet"]


@pytest.fixture(scope="module")
def env(module_env, small_study):
    """The module's commands share the study's environment (its dataset cache and Ray temp dir)."""
    return module_env


@pytest.fixture(scope="module")
def study(small_study):
    return small_study


def copy_study(study, dest):
    """The study without its PBT stage and final stages (a copy: it reads and writes its own optuna.db)."""
    shutil.copytree(study, dest, ignore=shutil.ignore_patterns("pbt", "final*", ".lock"))
    return dest


@pytest.fixture(scope="module")
def pbt(env, study):
    r = fer_tune(env, "pbt", study, *FAST)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    return study / "pbt", r


def rows_of(out):
    with open(out / "population.csv") as fh:
        return list(csv.DictReader(fh))


def test_pbt_seeds_the_population_from_the_top_trials_and_records_the_lineage(env, study, pbt):
    out, r = pbt
    rec = json.loads((out / "pbt.json").read_text())
    with open(study / "trials.csv") as fh:
        trials = sorted((x for x in csv.DictReader(fh) if x["best_val_acc"]), key=lambda x: -float(x["best_val_acc"]))
    assert [m["trial"]["number"] for m in rec["members"]] == [int(t["number"]) for t in trials[:2]]
    # four members: the top two, then the two again with each value x0.8 or x1.2; scheduler constant
    assert [p["origin"] for p in rec["points"]] == [0, 1, 0, 1]
    for p, base in zip(rec["points"][:2], rec["bases"]):
        assert all(p[k] == base[k] for k in KEYS) and base["scheduler"] == "constant" and base["epochs"] == 4
    for p, first in zip(rec["points"][2:], rec["points"][:2]):
        assert all(p[k] != first[k] or first[k] == 0 for k in KEYS)
    rows = rows_of(out)
    assert {int(x["member"]) for x in rows} == {0, 1, 2, 3}
    last = {}
    for x in rows:
        last[int(x["member"])] = int(x["epoch"])
    assert set(last.values()) == {4}  # every member trained to the end
    lineage = json.loads((out / "lineage.json").read_text())
    assert {1, 2, 3} <= {e["epoch"] for e in lineage["clones"]}, lineage["clones"]  # one clone per interval at least
    for e in lineage["clones"]:
        assert set(e["old"]) == set(e["new"]) == set(KEYS) and 1 <= e["epoch"] <= 4
        seg = [
            x
            for x in rows
            if int(x["member"]) == e["into"] and x["segment"] == f"member {e['from']} at epoch {e['epoch']}"
        ]
        if e["epoch"] < 4 and seg:  # its next epoch ran with the mutated values (read back from the optimizer)
            assert float(seg[0]["lr"]) == pytest.approx(e["new"]["lr"]) and int(seg[0]["epoch"]) == e["epoch"] + 1
            assert float(seg[0]["weight_decay"]) == pytest.approx(e["new"]["weight_decay"])
            assert float(seg[0]["dropout"]) == pytest.approx(e["new"]["dropout"])
    for m in lineage["members"].values():
        assert m["schedule"][0]["first"] == 1 and m["schedule"][-1]["last"] == 4
    # the stage's own lines: the clones, the best member
    assert "PBT stage" in r.stdout and "took member" in r.stdout and "best: member" in r.stdout


def test_the_best_member_is_evaluated_exported_and_shown(env, study, pbt):
    out, _ = pbt
    m = json.loads((out / "metrics.json").read_text())
    best = m["best"]
    assert m["status"] == "complete" and best["value"] == max(x["value"] for x in m["members"])
    ev = json.loads((out / "best" / "metrics.json").read_text())
    assert list(ev["models"]) == ["last"] and ev["models"]["last"]["crops"] == "ten"
    assert m["test"]["top1"] == ev["models"]["last"]["top1"] and [h["epoch"] for h in ev["history"]] == [1, 2, 3, 4]
    assert ev["history"][-1]["val_acc"] == pytest.approx(best["value"])
    for f in ("model.pt", "model.pt2", "model.json", "best/confusion_last.csv", "best/saliency.png"):
        assert (out / f).is_file(), f
    card = json.loads((out / "model.json").read_text())
    assert card["test"]["top1"] == pytest.approx(m["test"]["top1"]) and card["trial"]["pbt"]["member"] == best["member"]
    r = fer_tune(env, "evaluate", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["top1"] == pytest.approx(m["test"]["top1"])
    r = fer_tune(env, "status", study)
    assert r.returncode == 0 and "PBT stage" in r.stdout and f"best: member {best['member']}" in r.stdout
    assert "perturbed every epoch, synchronously" in r.stdout
    s = json.loads(fer_tune(env, "status", study, "--json").stdout)["pbt"]
    assert s["metrics"]["best"]["member"] == best["member"] and len(s["members"]) == len(m["members"])
    r = fer_tune(env, "report", study)
    html = (study / "report.html").read_text()
    assert r.returncode == 0 and 'id="pbt"' in html and "fig-pbt-population" in html and "fig-pbt-schedules" in html
    assert 'id="pbt-clones"' in html and "every epoch, synchronously" in html
    # again: complete; other settings: refused, naming them
    r = fer_tune(env, "pbt", study, *FAST)
    assert r.returncode == 0 and "the PBT stage is complete" in r.stderr
    r = fer_tune(env, "pbt", study, "--epochs", "6")
    assert r.returncode == 2 and "--epochs 6 (recorded: 4)" in r.stderr and r.stderr.count("\n") == 1


def test_final_from_pbt_replays_the_best_members_schedule(env, study, pbt):
    out, _ = pbt
    m = json.loads((out / "metrics.json").read_text())
    r = fer_tune(env, "final", study, "--from-pbt", "--finetune-epochs", "1", "--eval-every", "2", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    fin = study / "final-pbt"
    rec = json.loads((fin / "final.json").read_text())
    assert rec["settings"]["from_pbt"] and rec["config"]["epochs"] == 4 and rec["config"]["scheduler"] == "constant"
    assert rec["schedule"] == {str(first): v for first, v in m["best"]["schedule"]}
    assert rec["trial"]["number"] == m["best"]["trial"]["number"]
    seed = json.loads((fin / "metrics.json").read_text())["seeds"][0]
    member = json.loads((out / "best" / "metrics.json").read_text())
    # retrained from scratch with the schedule: the member's run, epoch for epoch (CPU, one thread: bit for bit)
    assert [h["val_acc"] for h in seed["history"]] == [h["val_acc"] for h in member["history"]]
    assert [h["lr"] for h in seed["history"]] == [h["lr"] for h in member["history"]]
    assert seed["models"]["last"]["top1"] == pytest.approx(m["test"]["top1"])
    assert len(seed["finetune_history"]) == 1 and (fin / "model.pt").is_file()
    html = (study / "report.html").read_text()
    assert "replayed from scratch" in html
    r = fer_tune(env, "final", study, "--from-pbt", "--trial", "0")
    assert r.returncode == 2 and "give one" in r.stderr and r.stderr.count("\n") == 1


def test_an_ensemble_of_the_pbt_stages_best_members_replays_each_ones_schedule(env, study, pbt, tmp_path):
    from fer_tune.tune.pbt.read import stage

    out = tmp_path / "ens"
    args = ("--from-pbt", "--ensemble", "2", "--finetune-epochs", "1", "--eval-every", "2", "--out", out, "--quiet")
    r = fer_tune(env, "final", study, *args)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    found = stage(study)
    rec = json.loads((out / "final.json").read_text())
    (member,) = rec["members"]
    pbt_member = next(m for m in found["members"] if m["member"] == member["trial"]["params"]["pbt_member"])
    best = found["metrics"]["best"]
    assert pbt_member["member"] != best["member"] and member["config"]["scheduler"] == "constant"
    others = [m["last"]["val_acc"] for m in found["members"] if m["member"] != best["member"]]
    assert pbt_member["last"]["val_acc"] == max(others)  # the next best at the last epoch
    assert member["schedule"] == {str(first): v for first, v in pbt_member["lineage"]["schedule"]}
    arms = {x["arm"] for f in out.glob("tune/*/result.json") for x in map(json.loads, f.read_text().splitlines())}
    assert arms == {"winner", "member-2"}
    e = json.loads((out / "metrics.json").read_text())["ensemble"]
    assert e["status"] == "complete" and len(e["members"]) == 2 and (out / "model.onnx").is_file()
    r = fer_tune(env, "final", study, "--from-pbt", "--ensemble", "9", "--out", tmp_path / "nine")
    assert r.returncode == 2 and "members of its PBT stage that trained all its epochs" in r.stderr, r.stderr


def test_pb2_continues_after_its_driver_is_killed(env, study, tmp_path):
    sdir = copy_study(study, tmp_path / "t")
    args = cli_args(
        "pbt",
        sdir,
        *("--top-k", "2", "--population", "3", "--epochs", "4", "--interval", "2"),
        "--method",
        "pb2",
        "--quiet",
        "--num-cpus",
        "2",
    )
    paused = pausing(env, tmp_path / "paused")  # a member's second epoch
    proc = subprocess.Popen(args, env=paused, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    kill_at_pause(proc, tmp_path / "paused")  # the driver and its Ray, as a crash would
    assert not (sdir / "pbt" / "metrics.json").exists()
    r = fer_tune(env, "status", sdir)
    assert r.returncode == 0 and "interrupted (fer-tune pbt continues it)" in r.stdout
    time.sleep(1)
    # continued as it ran: its own local Ray of 2 CPUs, two of the three members at a time
    r = fer_tune(env, "pbt", sdir, "--quiet", "--num-cpus", "2", process=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "continuing the PBT stage" in r.stderr
    results = [json.loads(x) for f in (sdir / "pbt").glob("tune/*/result.json") for x in f.read_text().splitlines()]
    assert max(x.get("start_epoch", 0) for x in results) >= 2  # members continued from their checkpoints
    rows = rows_of(sdir / "pbt")
    assert {int(x["member"]) for x in rows if x["epoch"] == "4"} == {0, 1, 2}
    m = json.loads((sdir / "pbt" / "metrics.json").read_text())
    assert m["status"] == "complete" and m["settings"]["method"] == "pb2"


STUCK_ENV = "FER_TUNE_TEST_STUCK_PBT"


def stuck_scheduler(real):
    """Ray's PBT scheduler (`real`, as the stage made it) made to go round in circles where STUCK_ENV is set, as
    one was seen to: member 1 is in the bottom quantile at every result, takes member 0's last checkpoint, and
    (its perturbation and train times reset) is chosen to run again before member 0 can go on."""

    class Stuck(type(real)):
        def _quantiles(self):
            if not os.environ.get(STUCK_ENV):
                return super()._quantiles()
            scored = [t for t, s in self._trial_state.items() if s.last_score is not None and not t.is_finished()]
            return ([scored[1]], [scored[0]]) if len(scored) == 2 else ([], [])

        def _exploit(self, tune_controller, trial, trial_to_clone):
            super()._exploit(tune_controller, trial, trial_to_clone)
            if os.environ.get(STUCK_ENV):
                state = self._trial_state[trial]
                state.last_perturbation_time = state.last_train_time = 0

    real.__class__ = Stuck
    return real


def test_a_pbt_scheduler_going_round_in_circles_stops_the_stage_which_then_continues(env, study, tmp_path, monkeypatch):
    from fer_tune.tune.pbt import driver

    sdir = copy_study(study, tmp_path / "t")
    make = driver.make_scheduler
    monkeypatch.setattr(driver, "make_scheduler", lambda rec: stuck_scheduler(make(rec)))
    args = ("--top-k", "2", "--population", "2", "--epochs", "4", "--interval", "1", "--quiet")
    r = fer_tune({**env, STUCK_ENV: "1"}, "pbt", sdir, *args)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    said = [x for x in r.stderr.splitlines() if "made no progress" in x]
    stuck = re.search(
        r"member 1 was restarted 5 times in a row from member 0's checkpoint of epoch (\d) and trained "
        r"epoch (\d) each time",
        said[0] if len(said) == 1 else "",
    )
    assert stuck and int(stuck[2]) == int(stuck[1]) + 1, r.stderr[-3000:]
    assert f"continue it with:\n    fer-tune pbt {sdir}" in r.stderr
    assert "Traceback" not in r.stderr and not (sdir / "pbt" / "metrics.json").exists()
    assert max(int(x["epoch"]) for x in rows_of(sdir / "pbt") if x["member"] == "1") == int(stuck[2])
    assert "interrupted (fer-tune pbt continues it)" in fer_tune(env, "status", sdir).stdout
    # the scheduler mended, the stage goes on from the members' checkpoints to the end
    r = fer_tune(env, "pbt", sdir, "--quiet")
    assert r.returncode == 0 and "continuing the PBT stage" in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert {x["member"] for x in rows_of(sdir / "pbt") if x["epoch"] == "4"} == {"0", "1"}
    assert json.loads((sdir / "pbt" / "metrics.json").read_text())["status"] == "complete"


def test_pbt_and_final_from_pbt_bad_inputs(env, study, tmp_path):
    bare = copy_study(study, tmp_path / "bare")
    for args, says in (
        ((tmp_path / "nope",), "not a fer-tune study directory"),
        ((bare, "--top-k", "5"), "--top-k 5 needs 5 finished trials with a val_acc, and the study has 3"),
        ((bare, "--mutate", "lr,momentum"), "--mutate lr,momentum: give keys among lr, weight_decay, dropout"),
        ((bare, "--epochs", "4", "--interval", "5"), "--interval 5 is longer than --epochs 4"),
        ((bare, "--population", "1", "--top-k", "1"), "--population must be >= 2"),
        ((bare, "--population", "2", "--top-k", "3"), "--population 2 is smaller than --top-k 3"),
        ((bare, "--epochs", "0"), "--epochs must be >= 1"),
    ):
        r = fer_tune(env, "pbt", *args)
        assert r.returncode == 2 and says in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (bare / "pbt" / "pbt.json").exists()
    r = fer_tune(env, "final", bare, "--from-pbt")
    assert r.returncode == 2 and "has no PBT stage: --from-pbt replays its best member" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
