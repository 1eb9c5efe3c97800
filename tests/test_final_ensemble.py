"""`fer-tune final --ensemble K` over a real tiny study: members chosen on validation, interrupted and continued,
the ensemble measured from its members' saved logits and exported as one model that `evaluate` scores alike."""

import csv
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from conftest import SPACE, cli_args, fer_tune, kill_at_pause, pausing


@pytest.fixture(scope="module")
def env(module_env):
    return module_env


def test_an_ensemble_stage_is_interrupted_continued_measured_and_exported(env, small_study, tmp_path):
    # a copy of its own: other modules' tests run final stages in the shared study's STUDY/final
    study = tmp_path / "results" / "t"
    shutil.copytree(small_study, study, ignore=shutil.ignore_patterns("final*", "pbt", "report.html"))
    out = study / "final"
    args = ["--ensemble", "3", "--epochs", "4", "--finetune-epochs", "1", "--eval-every", "2"]
    said = tmp_path / "said.txt"
    with said.open("w") as fh:
        proc = subprocess.Popen(
            cli_args("final", study, *args, "--baseline", "paper", "--quiet"),
            env=pausing(env, tmp_path / "paused", results=6),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        kill_at_pause(proc, tmp_path / "paused")  # the driver and its Ray, as a crash would
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {said.read_text()[-3000:]}") from None
    assert not (out / "metrics.json").exists()
    r = fer_tune(env, "final", study, "--quiet")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    # the members: the study's three best configurations on validation, best first
    with open(study / "trials.csv") as fh:
        rows = sorted((x for x in csv.DictReader(fh) if x["best_val_acc"]), key=lambda x: -float(x["best_val_acc"]))
    rec = json.loads((out / "final.json").read_text())
    chosen = [rec["trial"]["number"]] + [m["trial"]["number"] for m in rec["members"]]
    assert chosen == [int(x["number"]) for x in rows[:3]]
    assert [m["arm"] for m in rec["members"]] == ["member-2", "member-3"]

    # continued, not started over: the members that ran before the kill went on from their checkpoints
    results = [json.loads(x) for f in out.glob("tune/*/result.json") for x in f.read_text().splitlines()]
    assert any(x.get("resumed_at", 0) >= 1 and x["arm"].startswith("member-") for x in results), results

    m = json.loads((out / "metrics.json").read_text())
    e = m["ensemble"]
    assert m["status"] == e["status"] == "complete" and m["exported"] == "ensemble"
    assert [x["trial"]["number"] for x in e["members"]] == chosen
    (s,) = e["seeds"]
    seed = s["seed"]

    # the ensemble's accuracy, computed here from the logits its members saved: per crop the mean of their softmax
    logits = np.stack(
        [np.load(out / d / f"seed-{seed}" / "test_logits.npy") for d in (".", "member-2", "member-3")]
    )  # (members, N, crops, 7)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    combined = np.log(probs.mean(0)).mean(1)  # the crops' log-probabilities averaged, as any model's logits
    from fer_tune.data import load

    _, labels = load(SPACE["data"]["path"], "paper").arrays("test")
    assert logits.shape == (3, len(labels), 10, 7)
    mine = 100.0 * float((combined.argmax(1) == labels).mean())
    assert s["test"]["top1"] == pytest.approx(mine, abs=1e-4)  # one image is 100 / N points
    members = [json.loads((out / d / f"seed-{seed}" / "metrics.json").read_text()) for d in (".", "member-2")]
    assert members[0]["models"]["finetuned"]["top1"] == pytest.approx(
        100.0 * float((logits[0].mean(1).argmax(1) == labels).mean())
    )  # a member's saved logits are those of its own score
    assert e["difference"]["top1"] == pytest.approx(s["test"]["top1"] - members[0]["models"]["finetuned"]["top1"])
    assert e["baseline_difference"]["top1"] == pytest.approx(
        s["test"]["top1"] - m["baseline"]["seeds"][0]["models"]["finetuned"]["top1"]
    )

    # one model holds the ensemble: evaluate scores it as the stage did; its card lists the members
    card = json.loads((out / "model.json").read_text())
    assert len(card["members"]) == 3 and card["onnx"]["status"] == "checked"
    assert (out / "model.onnx").is_file() and (out / "ensemble" / f"seed-{seed}" / "model.pt").is_file()
    r = fer_tune(env, "evaluate", out, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["top1"] == pytest.approx(s["test"]["top1"], abs=100.0 / len(labels) + 1e-9)
    text = fer_tune(env, "final", study, "--quiet").stdout
    assert "ensemble of 3" in text and "on member 1" in text, text

    # the report sets the members and the ensemble side by side
    page = (study / "report.html").read_text()
    table = page[page.index('id="final-ensemble"') :]
    table = table[: table.index("</table>")]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", table)
    assert [c for c in cells if c.startswith(("member", "ensemble", "paper"))] == [
        "member 1",
        "member 2",
        "member 3",
        "ensemble",
        "paper recipe",
    ]
    assert f"{s['test']['top1']:.2f}" in cells
    # and the decision at the top, in the report and in status, says what the ensemble adds and how sure that is
    assert 'id="decision-ensemble"' in page
    said = fer_tune(env, "status", study).stdout
    assert f"Ensemble: the 3 members (trials {', '.join(map(str, chosen))}) together score" in said, said
    assert f"{e['difference']['top1']:+.2f} points on member 1" in said


def test_an_ensemble_is_refused_beside_one_trial_and_beyond_the_studys_distinct_configurations(env, small_study):
    r = fer_tune(env, "final", small_study, "--ensemble", "2", "--trial", "1")
    assert r.returncode == 2 and "give one" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = fer_tune(env, "final", small_study, "--ensemble", "9", "--out", small_study.parent / "nine")
    assert r.returncode == 2 and "--ensemble 9:" in r.stderr and "give --ensemble 3 or fewer" in r.stderr, r.stderr
    assert not (small_study.parent / "nine").exists()


def test_mlflow_gets_the_ensembles_test_metrics_and_what_it_adds():
    from fer_tune.recipe import mean_std
    from fer_tune.tune.mlflow.final import test_points

    agg = {k: mean_std([v, v + 1]) for k, v in (("top1", 70.0), ("top2", 85.0), ("macro_f1", 60.0))}
    e = {"aggregate": agg, "difference": {"top1": 1.25}, "baseline_difference": {"top1": 2.5}}
    points = {k: v for k, v, _ in test_points({"ensemble": e})}
    assert points["ensemble/test_top1_finetuned"] == 70.5 and points["ensemble/test_top1_finetuned_std"] > 0
    assert points["ensemble/difference_top1_finetuned"] == 1.25
    assert points["ensemble/baseline_difference_top1_finetuned"] == 2.5
