"""The decision summary (fer_tune.report.decision): its statistics against published values, and its facts on
studies made by hand (tests/crafted.py: no Ray, no training): a tie, collapsed trials and the setting they share,
a parameter at the edge of its range, the final stage and its baseline, a study with no score, a multi-objective
study; the same facts in `fer-tune status` (<= 100 columns, --wide, --json) and at the top of the report."""

import json
import re

import pytest
from crafted import SPACE, craft_study, one_class, some_of_each, trial

from fer_tune.cli import main
from fer_tune.common import EMOTIONS
from fer_tune.report.decision import decide, newcombe, wilson
from fer_tune.report.decision_words import sentences
from fer_tune.report.final import load_final
from fer_tune.tune.study.outputs import status_summary, study_results
from fer_tune.tune.study.record import read_study

SGD, ADAM = "sgd_nesterov", "adam"
TRIALS = [
    # the winner: 139 of 301 val images; its dropout 0.49 sits at the top of 0 .. 0.5
    trial(0, {"optimizer": SGD, "lr": 0.003, "dropout": 0.49}, [30.0, 38.0, 44.0, 46.18], recalls=some_of_each(30)),
    trial(1, {"optimizer": ADAM, "lr": 0.03, "dropout": 0.1}, [25.58, 25.58], recalls=one_class("happy")),
    # within the winner's interval (40.6 .. 51.8): a tie
    trial(2, {"optimizer": SGD, "lr": 0.0012, "dropout": 0.2}, [28.0, 35.0, 40.0, 44.5], recalls=some_of_each(25)),
    trial(3, {"optimizer": ADAM, "lr": 0.05, "dropout": 0.3}, [25.58, 25.58], recalls=one_class("happy")),
    # below the interval: no tie
    trial(4, {"optimizer": SGD, "lr": 0.0003, "dropout": 0.25}, [20.0, 30.0, 33.0, 36.0], recalls=some_of_each(20)),
    # learns something, yet scores below the majority-class rate (25.58 %: happy's share of val)
    trial(5, {"optimizer": SGD, "lr": 0.02, "dropout": 0.4}, [22.0, 24.0], recalls=some_of_each(10)),
]


def facts_of(sdir):
    record = read_study(sdir)
    scanned = study_results(sdir, record)
    return decide(sdir, record, status_summary(sdir, record, scanned), scanned[0], load_final(sdir))


def said(facts) -> dict:
    return dict(sentences(facts))


# ---------------------------------------------------------------------------------------------------------
# the statistics
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "k, n, low, high",
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", table I, method 3 (Wilson)
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_matches_the_published_values(k, n, low, high):
    lo, hi = wilson(100 * k / n, n)
    assert (round(lo / 100, 4), round(hi / 100, 4)) == (low, high)


def test_newcombe_difference_interval_matches_the_published_values():
    # Newcombe (1998), "Interval estimation for the difference between independent proportions", method 10
    lo, hi = newcombe(100 * 56 / 70, 70, 100 * 48 / 80, 80)
    assert (round(lo / 100, 4), round(hi / 100, 4)) == (0.0524, 0.3339)
    lo, hi = newcombe(90.0, 10, 30.0, 10)
    assert (round(lo / 100, 4), round(hi / 100, 4)) == (0.1705, 0.8090)


# ---------------------------------------------------------------------------------------------------------
# the facts of a crafted study
# ---------------------------------------------------------------------------------------------------------
def test_winner_tie_collapse_edge_and_cost(tmp_path):
    sdir = craft_study(tmp_path, TRIALS)
    f = facts_of(sdir)
    w = f["winner"]
    assert (w["trial"], w["value"], w["epoch"]) == (0, 46.18, 4) and f["val_images"] == 301
    assert w["interval"] == pytest.approx(list(wilson(46.18, 301))) and 40 < w["interval"][0] < w["interval"][1] < 52
    assert [t["trial"] for t in f["ties"]] == [2] and f["runner_up"] == {"trial": 2, "value": 44.5}
    assert f["majority"] == {"class": "happy", "pct": pytest.approx(100 * 77 / 301), "recorded": True}
    assert {c["trial"]: c["predicts"] for c in f["collapsed"]} == {1: "happy", 3: "happy", 5: None}
    assert f["collapsed_setting"] == ["lr >= 0.02"]  # every collapsed trial has it, no healthy one does
    assert [(e["param"], e["side"]) for e in f["edges"]] == [("dropout", "high")]
    assert f["cost"]["epochs_trained"] == 18 and f["cost"]["epoch_budget"] == 24
    assert f["final"] is None and f["next"] == f"fer-tune final {sdir}"
    words = said(f)
    assert words["winner"].startswith("Winner: trial 0, val_acc 46.18 % at epoch 4 (95 % interval 40.6 to 51.8 %")
    assert "trial 2 (44.50 %)" in words["ties"]
    assert "trials 1, 3 predict happy for every val face" in words["collapsed"]
    assert "trial 5 scores at or below the majority-class rate" in words["collapsed"]
    assert "All have lr >= 0.02" in words["collapsed"] and "chance is 14.29 %" in words["collapsed"]
    assert words["edges"].startswith("Edges: widen dropout") and "0.49, at the top of 0 .. 0.5" in words["edges"]
    assert "18 trial epochs trained of the 24" in words["cost"] and "25 % saved" in words["cost"]
    assert "Final stage: not run yet" in words["final"] and "baseline" not in words
    assert "warm" not in words and f["warm_start"] == []


def test_the_configurations_run_first_are_placed_beside_the_winner(tmp_path):
    trials = [dict(t) for t in TRIALS]
    trials[2]["warm"], trials[4]["warm"], trials[1]["warm"] = "paper", "joint#7", "joint#3"
    f = facts_of(craft_study(tmp_path, trials))
    assert [(w["trial"], w["from"]) for w in f["warm_start"]] == [(1, "joint#3"), (2, "paper"), (4, "joint#7")]
    assert said(f)["warm"] == (
        "Warm start: trial 1 ran joint's trial 3 (25.58 %, pruned); trial 2 ran the paper's recipe (44.50 %, a tie "
        "with the winner); trial 4 ran joint's trial 7 (36.00 %)."
    )


def test_no_tie_and_no_collapse_and_the_majority_rate_when_it_was_not_recorded(tmp_path):
    healthy = [t for t in TRIALS if t["number"] in (0, 4)]
    f = facts_of(craft_study(tmp_path / "a", healthy))
    assert f["ties"] == [] and f["collapsed"] == [] and f["edges"]
    assert "Ties: none; the next best, trial 1 at 36.00 %" in said(f)["ties"]
    assert said(f)["ties"].endswith("lies below the winner's interval.")
    # the next best scores inside the winner's interval but collapsed: no tie, and not "below" either
    g = facts_of(craft_study(tmp_path / "c", [TRIALS[1], TRIALS[3]]))
    assert g["ties"] == [] and g["runner_up"]["value"] == g["winner"]["value"] == 25.58
    assert said(g)["ties"] == (
        "Ties: none; the next best, trial 1 at 25.58 %, lies inside the winner's interval but learnt no emotion "
        "(below)."
    )
    assert said(f)["collapsed"].startswith("Collapsed: none (no trial predicts")
    # several trials share the next best value: all of them are named, not the last one sorted
    twin = trial(6, {"optimizer": ADAM, "lr": 0.001, "dropout": 0.3}, [20.0, 30.0, 36.0], recalls=some_of_each(20))
    h = facts_of(craft_study(tmp_path / "d", [*healthy, twin]))  # (numbered in this order: 0, 1, 2)
    assert h["runner_up"] == {"trial": 1, "value": 36.0, "tied": [1, 2]}, h["runner_up"]
    assert said(h)["ties"] == "Ties: none; the next best, trials 1, 2 at 36.00 %, lie below the winner's interval."
    # a study recorded before the val split's class counts: a one-emotion trial gives a lower bound
    f = facts_of(craft_study(tmp_path / "b", TRIALS[:2], class_counts=False))
    assert f["majority"] == {"class": "happy", "pct": 25.58, "recorded": False}
    assert "at least 25.58 %" in said(f)["collapsed"]
    # one collapsed trial: no shared setting is claimed from a single trial
    assert f["collapsed_setting"] == []


def test_a_winner_not_shown_above_the_majority_rate_and_no_tie_with_a_collapsed_trial(tmp_path):
    weak = trial(0, {"optimizer": SGD, "lr": 0.003, "dropout": 0.2}, [20.0, 24.0, 26.0, 28.0], recalls=some_of_each(20))
    f = facts_of(craft_study(tmp_path, [weak, TRIALS[1]]))
    assert f["winner"]["interval"][0] < 25.58 and f["winner"]["above_majority"] is False
    assert f["ties"] == [] and [c["trial"] for c in f["collapsed"]] == [1]  # inside the interval, yet collapsed
    assert "has not shown that it beats predicting the commonest emotion" in said(f)["winner"]
    assert facts_of(craft_study(tmp_path / "b", TRIALS))["winner"]["above_majority"] is True


def test_a_study_without_a_score_and_an_interrupted_one(tmp_path):
    f = facts_of(
        craft_study(tmp_path / "a", [trial(0, {"optimizer": SGD, "lr": 0.01, "dropout": 0.2}, [], status="running")])
    )
    assert f["winner"] is None and f["ties"] == [] and f["collapsed"] == []
    assert said(f)["winner"].startswith("No trial has reported val_acc yet")
    assert f["next"].startswith("fer-tune resume ")
    assert main(["status", str(tmp_path / "a" / "crafted")]) == 0


def test_a_multi_objective_study(tmp_path):
    space = {"metric": ["val_acc", "mflops"], "mode": ["max", "min"]}
    trials = [
        trial(0, {"optimizer": SGD, "lr": 0.003, "dropout": 0.2}, [40.0, 44.0, 45.0, 46.0], mflops=9.0),
        trial(1, {"optimizer": SGD, "lr": 0.004, "dropout": 0.3}, [40.0, 42.0, 43.0, 44.0], mflops=2.0),
        trial(2, {"optimizer": ADAM, "lr": 0.01, "dropout": 0.1}, [30.0, 31.0, 31.0, 31.0], mflops=5.0),
    ]
    f = facts_of(craft_study(tmp_path, trials, space=space))
    assert f["winner"]["trial"] == 0 and [t["trial"] for t in f["ties"]] == [1]
    assert said(f)["winner"].startswith("Winner: trial 0, the Pareto front's best val_acc, val_acc 46.00 %")


def test_a_metric_that_is_no_accuracy_has_no_interval(tmp_path):
    f = facts_of(craft_study(tmp_path, TRIALS[:3], space={"metric": "val_loss", "mode": "min"}))
    assert f["winner"]["trial"] == 0 and f["winner"]["interval"] is None and f["ties"] == []
    assert f["interval_method"] is None and f["collapsed"] == [] and f["runner_up"]["trial"] == 2
    words = said(f)
    assert "no interval: the summary computes intervals for accuracies, not val_loss" in words["winner"]
    assert "ties" not in words and "collapsed" not in words


def _final(sdir, *, baseline: bool, seeds=(0, 1)):
    """final/ as the final stage leaves it: per-seed test top-1 on 298 images, and the paper recipe beside it."""
    fdir = sdir / "final"
    fdir.mkdir()

    def model(top1):  # a confusion matrix of 298 images
        conf = [[0] * 7 for _ in EMOTIONS]
        conf[0][0] = 298
        return {"top1": top1, "top2": top1 + 10, "macro_f1": top1 - 5, "confusion": conf}

    def run(seed, shift):
        return {
            "seed": seed,
            "status": "complete",
            "best_val_acc": 50.0,
            "device_seconds": 360.0,
            "models": {
                m: model(v + shift + seed) for m, v in (("last", 60.0), ("best_val", 61.0), ("finetuned", 64.0))
            },
        }

    def agg(runs):
        from fer_tune.recipe import aggregate

        return aggregate(runs)

    ok = [run(s, 0) for s in seeds]
    m = {"status": "complete", "seeds": ok, "aggregate": agg(ok), "device_hours": 0.2, "trial": {"number": 0}}
    if baseline:
        b = [run(s, -3) for s in seeds]
        ba = agg(b)
        m["baseline"] = {
            "name": "paper",
            "seeds": b,
            "aggregate": ba,
            "difference_seeds": list(seeds),
            "difference": {n: {"top1": m["aggregate"][n]["top1"]["mean"] - ba[n]["top1"]["mean"]} for n in ba},
        }
    (fdir / "final.json").write_text(json.dumps({"trial": {"number": 0}, "seeds": list(seeds)}))
    (fdir / "metrics.json").write_text(json.dumps(m))


def test_the_final_stage_and_its_baseline(tmp_path):
    sdir = craft_study(tmp_path, TRIALS)
    (sdir / "final").mkdir()
    f = facts_of(sdir)
    assert f["final"]["state"] == "unfinished" and f["next"] == f"fer-tune final {sdir}"
    assert said(f)["final"] == "Final stage: started and not finished: no test score yet."
    (sdir / "final").rmdir()
    _final(sdir, baseline=False)
    f = facts_of(sdir)
    fin = f["final"]
    assert fin["model"] == "finetuned" and fin["top1"] == 64.5 and fin["seeds"] == [64.0, 65.0]
    assert fin["test_images"] == 298 and fin["interval"] == pytest.approx(list(wilson(64.5, 298)))
    assert f["cost"]["final_device_hours"] == 0.2 and f["next"] == f"fer-tune predict {sdir / 'final'} IMAGE"
    words = said(f)
    assert (
        "test top-1 of the fine-tuned model 64.50 % (95 % interval 58.9 to 69.7 % on 298 test images)" in words["final"]
    )
    assert "over 2 seeds 64.00 to 65.00 % (std 0.71)" in words["final"]
    assert "last epoch 60.50 %" in words["final"] and words["baseline"].startswith("Baseline: none")

    for p in (sdir / "final").iterdir():
        p.unlink()
    (sdir / "final").rmdir()
    _final(sdir, baseline=True, seeds=(0,))
    f = facts_of(sdir)
    b = f["final"]["baseline"]
    assert b["difference"] == pytest.approx(3.0) and b["per_seed"] == [pytest.approx(3.0)]
    assert b["interval"] == pytest.approx(list(newcombe(64.0, 298, 61.0, 298)))
    words = said(f)
    assert "one seed, so no seed spread" in words["final"]
    assert "the paper recipe scored 61.00 %; the study's configuration leads it by 3.00 points" in words["baseline"]
    assert "the test split cannot tell them apart" in words["baseline"]  # 3 points on 298 images


# ---------------------------------------------------------------------------------------------------------
# fer-tune status and the report
# ---------------------------------------------------------------------------------------------------------
def test_status_marks_the_best_ties_and_collapsed_trials_in_100_columns(tmp_path, capsys):
    keys = ("weight_decay", "momentum", "label_smoothing", "mixup", "cutmix", "mix_p", "erase_p", "gamma", "eta_min")
    many = {k: {"type": "float", "low": 0.1, "high": 0.3} for k in keys}
    space = {"space": {**SPACE["space"], **many}}
    trials = [{**t, "params": {**t["params"], **{k: 0.123456 + 0.01 * i for i, k in enumerate(many)}}} for t in TRIALS]
    sdir = craft_study(tmp_path, trials, space=space)
    assert main(["status", str(sdir)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(len(line) <= 100 for line in lines if str(sdir) not in line), [x for x in lines if len(x) > 100]
    rows = {int(m[2]): m[1] for line in lines if (m := re.match(r"([*=x ]) +(\d+) (completed|pruned)", line))}
    assert rows == {0: "*", 1: "x", 2: "=", 3: "x", 4: " ", 5: "x"}
    assert "* best (fer-tune final takes it)" in out and "more parameters left out to fit 100 columns: --wide" in out
    assert "Winner: trial 0" in out and "Ties: trial 2 (44.50 %) lies inside" in out and "Collapsed: 3 of 6" in out
    assert f"report: not written yet (fer-tune report {sdir})" in out
    assert lines[-1] == f"Next: fer-tune final {sdir}"

    assert main(["status", str(sdir), "--wide"]) == 0
    wide = capsys.readouterr().out
    assert "eta_min" in wide and "--wide)" not in wide

    assert main(["status", str(sdir), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)["decision"]
    assert d["winner"]["trial"] == 0 and [t["trial"] for t in d["ties"]] == [2]
    assert d["interval_method"] == "95 % Wilson score interval" and d["next"] == f"fer-tune final {sdir}"
    assert [c["trial"] for c in d["collapsed"]] == [1, 3, 5] and d["report"] is None


def test_the_report_opens_with_the_decision(tmp_path):
    from fer_tune.report import write_report

    sdir = craft_study(tmp_path, TRIALS)
    text = write_report(sdir).read_text()
    first = re.findall(r'<section id="([\w-]+)"', text)[0]
    assert first == "decision"
    for key in ("winner", "ties", "collapsed", "edges", "final", "cost", "next", "definitions"):
        assert f'id="decision-{key}"' in text, key
    assert "Wilson score interval for a binomial proportion" in text and "Newcombe" in text
    assert main(["status", str(sdir), "--json"]) == 0


def test_a_study_of_many_trials_shows_its_best_and_folds_the_rest(tmp_path, capsys):
    from fer_tune.report import write_report

    rng = __import__("random").Random(0)
    trials = []
    for n in range(60):
        top = rng.uniform(30, 50)
        vals = [top - 6, top - 2, top] if n % 3 else [top - 6, top - 3]  # every third one pruned at epoch 2
        trials.append(trial(n, {"optimizer": "adam", "lr": 1e-3 * (1 + n), "dropout": 0.2}, vals))
    sdir = craft_study(tmp_path, trials)
    best = sorted(trials, key=lambda t: -max(t["vals"]))
    assert main(["status", str(sdir)]) == 0
    out = capsys.readouterr().out
    shown = [int(m[1]) for line in out.splitlines() if (m := re.match(r"[*=x ] +(\d+) (?:completed|pruned)", line))]
    assert sorted(shown) == shown and set(shown) >= {t["number"] for t in best[:20]} and len(shown) < 30
    assert f"({60 - len(shown)} more trials: --all)" in out
    assert main(["status", str(sdir), "--all"]) == 0
    assert "--all)" not in capsys.readouterr().out

    text = write_report(sdir).read_text()
    top = re.search(r'<table id="trials-table">(.*?)</table>', text, re.S).group(1)
    numbers = [int(x) for x in re.findall(r'<tr(?: class="best")?><td class="num">(\d+)</td>', top)]
    assert numbers == [t["number"] for t in best[:25]]  # the best 25, best first
    every = re.search(r'<table id="trials-all" class="sortable">(.*?)</table>', text, re.S).group(1)
    assert len(re.findall(r"<tr", every)) == 61 and "<details><summary>All 60 trials" in text
    curves = next(f for f in re.findall(r"ferFigure\((.*?)\);</script>", text) if f.startswith('"fig-curves"'))
    assert curves.count('"name":"the other 40 trials"') == 1 and curves.count('"mode":"lines+markers"') == 20
    assert "the best 20 of 60 trials, the others in grey" in curves


def test_a_copy_without_the_trials_results_says_so_and_moves_nothing_on(tmp_path):
    """`rsync --exclude tune/` to a laptop: Optuna's database says the trials finished, their results are not
    there. The summary opens with that, not with "nothing to decide", and its next step is to bring them back."""
    import shutil

    sdir = craft_study(tmp_path / "a", [t for t in TRIALS if t["number"] in (0, 4)])
    assert facts_of(sdir)["unread"] is None
    record = read_study(sdir)
    shutil.rmtree(sdir / record["runs"][0]["dir"])
    f = facts_of(sdir)
    assert f["unread"] == {"trials": 2, "where": [str(sdir / record["runs"][0]["dir"])]}, f["unread"]
    first, *_ = sentences(f)
    assert first[0] == "unread" and first[1].startswith("Results missing: 2 finished trial(s) have none in "), first
    assert f["next"] == f"fer-tune status {sdir}, once the trials' results are back in {f['unread']['where'][0]}"
