"""The study report: one real tiny study (a `fer-tune sweep` subprocess, once per module) plus a made-up final/
directory in the layout fer_tune.tune.final.driver writes; content checks on the HTML and a real browser (headless chromium,
offline, file://) that must render every figure without console errors."""

import base64
import csv
import gzip
import html
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import fer_tune

from fer_tune.cli import main
from fer_tune.common import EMOTIONS
from fer_tune.evaluate import metrics_from_logits
from fer_tune.report import write_report
from fer_tune.report.html import PLOTLY_JS, TRACE_TYPES

EVIL = "<img src=x onerror=alert(1)>"
SPACE = {
    "name": "r",
    "description": 'report test <script>alert("d")</script> & co',
    "sampler": "tpe",
    "seed": 0,
    "num_samples": 4,
    "max_epochs": 3,
    "early_stopping": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
    "resources": {"cpu": 1, "gpu": 0},
    "data": {"path": "synthetic:700", "protocol": "paper"},
    "fixed": {"width": 0.0625, "train_crops": "one", "test_crops": "center", "batch_size": 32, "threads": 1},
    "space": {
        "optimizer": {"type": "categorical", "choices": ["sgd_nesterov", "adam"]},
        "lr": {"type": "float", "low": 2e-3, "high": 5e-2, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    },
}


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory, module_env):
    """A real study, swept by the CLI (which writes the report when it finishes); then its recorded name is made
    EVIL (a hand-edited study.json: study names from the CLI are plain) and the report written again."""
    tmp = tmp_path_factory.mktemp("report")
    space = tmp / "r.yaml"
    space.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    r = fer_tune(module_env, "sweep", space, "--results", tmp / "results", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    sdir = tmp / "results" / "r"
    assert "<script>alert" not in (sdir / "report.html").read_text()
    record = json.loads((sdir / "study.json").read_text())
    (sdir / "study.json").write_text(json.dumps({**record, "name": EVIL}))
    write_report(sdir)
    return {"dir": sdir, "stdout": r.stdout, "tmp": tmp}


def copy_study(study, tmp_path) -> Path:
    dest = tmp_path / "results" / "copy"
    shutil.copytree(study["dir"], dest, ignore=shutil.ignore_patterns("report.html"))
    rec = json.loads((dest / "study.json").read_text())
    rec["storage"] = f"sqlite:///{dest / 'optuna.db'}"
    (dest / "study.json").write_text(json.dumps(rec))
    return dest


def _eval(rng, n=70) -> dict:
    labels = np.arange(n) % len(EMOTIONS)
    logits = rng.normal(size=(n, len(EMOTIONS))) + 2.0 * np.eye(len(EMOTIONS))[labels] * (rng.random(n)[:, None] > 0.4)
    return {**metrics_from_logits(logits, labels), "crops": "ten"}


def _history(rng, epochs, eval_every, base):
    rows = []
    for e in range(1, epochs + 1):
        h = {
            "epoch": e,
            "train_loss": round(2.0 - 0.15 * e + rng.random() * 0.05, 4),
            "train_acc": round(base + 4 * e + rng.random(), 3),
            "val_loss": round(1.9 - 0.1 * e, 4),
            "val_acc": round(base + 3 * e - (e == epochs) * 2 + rng.random(), 3),
            "lr": 0.01,
            "epoch_seconds": 1.5,
        }
        if e % eval_every == 0 or e == epochs:
            h["test_acc"] = round(base + 2.5 * e + rng.random(), 3)
        rows.append(h)
    return rows


def make_final(sdir: Path, *, complete: bool = True, seeds=(0, 1), baseline: bool = False) -> dict:
    """results/NAME/final/ as fer_tune.tune.final.driver writes it, with small made-up numbers."""
    fdir = sdir / "final"
    fdir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    params = {"optimizer": "adam", "lr": 0.01, "dropout": 0.2}
    info = {
        "study": sdir.name,
        "trial": {"number": 1, "ray_trial_id": "abc123", "metric": "val_acc", "value": 40.5, "params": params},
        "config": {"epochs": 6, "width": 0.0625, **params},
        "seeds": list(seeds),
        "eval_every": 2,
        "finetune": {"epochs": 3, "lr": 1e-4, "scheduler": "cosine", "on": "train+val"},
        "protocol": "paper",
        "created": "2026-11-29 10:00:00",
    }
    (fdir / "final.json").write_text(json.dumps(info))
    seed_rows, hist_rows = [], []
    for i, s in enumerate(seeds):
        hist, ft = _history(rng, 6, 2, 20 + 3 * i), _history(rng, 3, 1, 40 + 3 * i)
        best = max(hist, key=lambda h: h["val_acc"])
        models = {m: _eval(rng) for m in ("last", "best_val", "finetuned")}
        seed_rows.append(
            {
                "seed": s,
                "status": "complete",
                "best_epoch": best["epoch"],
                "best_val_acc": best["val_acc"],
                "history": hist,
                "finetune_history": ft,
                "models": models,
                "device_seconds": 12.5,
            }
        )
        for phase, rows in (("train", hist), ("finetune", ft)):
            hist_rows += [
                {
                    "seed": s,
                    "phase": phase,
                    **{
                        k: h.get(k, "")
                        for k in (
                            "epoch",
                            "train_loss",
                            "train_acc",
                            "val_loss",
                            "val_acc",
                            "test_acc",
                            "lr",
                            "epoch_seconds",
                        )
                    },
                }
                for h in rows
            ]
        sd = fdir / f"seed-{s}"
        sd.mkdir()
        from PIL import Image

        Image.fromarray((rng.random((40, 80, 3)) * 255).astype(np.uint8)).save(sd / "saliency.png")
        np.savez(
            sd / "saliency.npz",
            images=np.zeros((7, 40, 40), np.uint8),
            saliency=np.zeros((7, 40, 40), np.float32),
            labels=np.arange(7),
            preds=np.arange(7),
        )
    with (fdir / "history.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(hist_rows[0]))
        w.writeheader()
        w.writerows(hist_rows)

    def mean_std(v):
        return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}

    metrics = {
        "study": sdir.name,
        "protocol": "paper",
        "protocol_note": "train=Training, val=PrivateTest, test=PublicTest",
        "trial": info["trial"],
        "config": info["config"],
        "finetune": info["finetune"],
        "seeds": seed_rows,
        "status": "complete",
        "aggregate": {
            m: {k: mean_std([s["models"][m][k] for s in seed_rows]) for k in ("top1", "top2", "macro_f1")}
            for m in ("last", "best_val", "finetuned")
        },
    }
    if baseline:  # the paper recipe beside it, 1.5 points worse on every model
        runs = [{**s, "models": {n: {**e, "top1": e["top1"] - 1.5} for n, e in s["models"].items()}} for s in seed_rows]
        agg = {
            n: {k: mean_std([s["models"][n][k] for s in runs]) for k in ("top1", "top2", "macro_f1")}
            for n in ("last", "best_val", "finetuned")
        }
        metrics["baseline"] = {
            "name": "paper",
            "seeds": runs,
            "aggregate": agg,
            "status": "complete",
            "config": {"optimizer": "sgd_nesterov", "lr": 0.01, "scheduler": "rlrp", "dropout": 0.2},
            "difference": {n: {k: metrics["aggregate"][n][k]["mean"] - agg[n][k]["mean"] for k in agg[n]} for n in agg},
        }
    if complete:
        (fdir / "metrics.json").write_text(json.dumps(metrics))
    return metrics


# ---------------------------------------------------------------------------------------------------------
# reading the HTML back
# ---------------------------------------------------------------------------------------------------------
def figure(text: str, div_id: str) -> dict:
    """The data and layout handed to Plotly.newPlot for one figure div (by the page's ferFigure, which adds the
    page's layout template)."""
    m = re.search(r'ferFigure\(\s*"' + re.escape(div_id) + r'",\s*-?\d+,\s*', text)
    assert m, f"no figure {div_id}"
    dec = json.JSONDecoder()
    data, end = dec.raw_decode(text, m.end())
    layout, _ = dec.raw_decode(text, text.index("{", end))
    return {"data": data, "layout": layout}


class Tables(HTMLParser):
    """Rows of text of every <table id=...>."""

    def __init__(self, text):
        super().__init__()
        self.tables, self._cur, self._cell = {}, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._cur = self.tables.setdefault(a.get("id", f"t{len(self.tables)}"), [])
        elif tag == "tr" and self._cur is not None:
            self._cur.append([])
        elif tag in ("td", "th") and self._cur is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cur is not None and self._cell is not None:
            self._cur[-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._cur = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def set_status(db, number: int, state: str, status: str) -> None:
    """Edit a trial in the Optuna sqlite DB as the study engine leaves it: state + the `status` user attribute."""
    tid = db.execute("SELECT trial_id FROM trials WHERE number=?", (number,)).fetchone()[0]
    db.execute("UPDATE trials SET state=? WHERE trial_id=?", (state, tid))
    db.execute(
        "UPDATE trial_user_attributes SET value_json=? WHERE trial_id=? AND key='status'", (json.dumps(status), tid)
    )


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def figure_ids(text):
    return re.findall(r'<div id="(fig-[\w-]+)" class="plotly-graph-div"', text)


# ---------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------
def test_sweep_writes_the_report_with_the_studys_numbers(study):
    sdir = study["dir"]
    report = sdir / "report.html"
    assert f"report: {report.resolve()}" in study["stdout"]
    text = report.read_text()
    ids = figure_ids(text)
    for fid in (
        "fig-optuna-history",
        "fig-optuna-parallel",
        "fig-optuna-slice",
        "fig-curves",
        "fig-cmp-optimizer",
        "fig-cmp-dropout",
        "fig-class-recall",
    ):
        assert fid in ids, (fid, ids)
    # 4 trials: the importances are either left out or shown with the caveat that so few trials only hint
    assert 'id="importance-note"' in text
    assert ("fig-optuna-importance" in ids) == ("read them as a hint of where to look" in text)
    rows = read_csv(sdir / "trials.csv")
    assert len(rows) == 4
    tables = Tables(text).tables
    shown = {r[0]: r for r in tables["trials-table"][1:]}
    header = tables["trials-table"][0]
    for r in rows:
        t = shown[r["number"]]
        assert t[header.index("status")] == r["status"]
        assert t[header.index("best_val_acc")] == f"{float(r['best_val_acc']):.2f}"  # one number format
        assert t[header.index("epochs")] == r["epochs"]
    summary = dict((k, v) for k, v in tables["summary-table"])
    assert summary["trials"].startswith("4 of 4 finished")
    best = max(rows, key=lambda r: float(r["best_val_acc"]))
    assert re.findall(r'<tr class="best"><td class="num">(\d+)</td>', text) == [best["number"]]
    # the runs and their sessions: the sweep started and finished, with no resume
    (run,) = tables["runs-table"][1:]
    assert run[0] == "tune" and re.fullmatch(r"started [-\d]+ [:\d]+, finished after \d:\d\d:\d\d", run[-1]), run
    assert "No trial was restarted" in text
    assert summary["best"].startswith(f"trial {best['number']}: val_acc {float(best['best_val_acc']):.2f}")
    # learning curves: one trace per trial, its values those of the trial's result.json
    curves = figure(text, "fig-curves")["data"]
    assert len(curves) == 4
    for tr in curves:
        number = re.match(r"trial (\d+)", tr["customdata"][0][0]).group(1)
        assert round(max(tr["y"]), 4) == float(next(r for r in rows if r["number"] == number)["best_val_acc"])
    # best per optimizer = the max over trials.csv
    bars = figure(text, "fig-cmp-optimizer")["data"][0]
    for opt, y in zip(bars["x"], bars["y"]):
        assert round(y, 4) == max(float(r["best_val_acc"]) for r in rows if r["param_optimizer"] == opt)
    # the class-aware view: recall of the best epoch, which averages (weighted by support) to val_acc
    from fer_tune.data import load

    y_val = load(SPACE["data"]["path"], "paper", cache_dir=str(study["tmp"] / "cache")).arrays("val")[1]
    support = np.bincount(y_val, minlength=len(EMOTIONS))
    heat = figure(text, "fig-class-recall")["data"][0]
    res = {}
    for f in sdir.glob("tune/*/result.json"):
        for line in f.read_text().splitlines():
            d = json.loads(line)
            res[(d["trial_id"], d["epoch"])] = d
    for label, z in zip(heat["y"], heat["z"]):
        r = next(r for r in rows if f"trial {r['number']}" == label)
        acc = res[(r["ray_trial_id"], int(r["best_epoch"]))]["val_acc"]
        recall = [v or 0.0 for v in z]
        assert abs(sum(np.array(recall) * support) / support.sum() - acc) < 1e-3


def test_offline_and_escaped(study):
    text = (study["dir"] / "report.html").read_text()
    # plotly.js inline, once: the shipped bundle, gzipped and base64-encoded
    (packed,) = re.findall(r'<script id="plotly-js" type="application/gzip">([A-Za-z0-9+/=]+)</script>', text)
    assert gzip.decompress(base64.b64decode(packed)) == PLOTLY_JS.read_bytes()
    assert text.count("ferFigure(") == len(figure_ids(text))  # each figure waits for plotly.js
    assert not re.findall(r"<script[^>]*\bsrc\s*=", text, re.I)
    assert not re.findall(r"<link[^>]*\bhref\s*=", text, re.I)
    markup = re.sub(r"<script\b[^>]*>.*?</script>", "<script></script>", text, flags=re.S | re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|ftp:)?//""", markup, re.I)  # no URL outside scripts
    # the study name and the YAML description appear as text, never as markup
    assert EVIL not in text and "<script>alert" not in text
    assert html.escape(EVIL) in text
    assert html.escape('report test <script>alert("d")</script> & co') in text
    # plotly renders HTML-like tags in titles: the name is escaped there too
    title = figure(text, "fig-optuna-history")["layout"]["title"]["text"]
    assert title == f"Optimization history of {html.escape(EVIL, quote=False)}"


def test_partial_study_is_shown_as_such(study, tmp_path):
    sdir = copy_study(study, tmp_path)
    rec = json.loads((sdir / "study.json").read_text())
    rec["runs"][0]["num_samples"] = 6  # two trials never started
    (sdir / "study.json").write_text(json.dumps(rec))
    with sqlite3.connect(sdir / "optuna.db") as db:  # a killed driver leaves its trial RUNNING
        db.execute("UPDATE trials SET state='RUNNING', datetime_complete=NULL WHERE number=0")
        set_status(db, 1, "PRUNED", "pruned")
    text = write_report(sdir).read_text()
    assert 'id="partial"' in text and "Partial study: 3 of 6 trials finished (1 started and unfinished)" in text
    assert "It was interrupted" in text and 'id="running-study"' not in text  # no command runs it
    curves = {tr["customdata"][0][0]: tr for tr in figure(text, "fig-curves")["data"]}
    stopped, pruned = curves["trial 0 (interrupted)"], curves["trial 1 (pruned)"]
    assert stopped["line"]["dash"] == "dashdot" and stopped["marker"]["symbol"][-1] == "circle-open"
    assert pruned["line"]["dash"] == "dash" and pruned["marker"]["symbol"][-1] == "x"
    # while a command runs it (a live process on this machine holds its lock), the same trial is running
    import socket

    (sdir / ".lock").write_text(
        json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getppid(),
                "command": "fer-tune resume x",
                "since": "2026-12-01 10:00:00",
            }
        )
    )
    text = write_report(sdir).read_text()
    assert 'id="running-study"' in text and "It is still running" in text
    assert "trial 0 (running)" in {tr["customdata"][0][0] for tr in figure(text, "fig-curves")["data"]}


def test_importance_is_explained_when_it_cannot_be_computed(study, tmp_path):
    sdir = copy_study(study, tmp_path)
    # one trial completed (which one, the order trials reach ASHA's rungs decides), the others diverged
    with sqlite3.connect(sdir / "optuna.db") as db:
        (keep,) = db.execute("SELECT MIN(number) FROM trials WHERE state = 'COMPLETE'").fetchone()
        for n in {0, 1, 2, 3} - {keep}:
            set_status(db, n, "FAIL", "diverged")
    text = write_report(sdir).read_text()
    ids = figure_ids(text)
    assert "fig-optuna-importance" not in ids and "fig-optuna-contour" not in ids
    assert "Hyperparameter importance is not shown: only 1 trial has completed" in text
    assert "fig-optuna-history" in ids
    for tr in figure(text, "fig-curves")["data"]:  # failed trials drawn dotted, red, with a thin x at the end
        failed = "(diverged)" in tr["customdata"][0][0]
        assert (tr["line"]["dash"] == "dot" and tr["marker"]["symbol"][-1] == "x-thin-open") == failed
    assert sum("(diverged)" in tr["customdata"][0][0] for tr in figure(text, "fig-curves")["data"]) == 3


def test_final_stage_complete(study, tmp_path):
    sdir = copy_study(study, tmp_path)
    m = make_final(sdir)
    text = write_report(sdir).read_text()
    ids = figure_ids(text)
    for fid in ("fig-final-curves", "fig-final-accuracy", "fig-final-confusion", "fig-final-per-class"):
        assert fid in ids
    assert 'id="final-state"' not in text  # complete: no running banner
    acc = Tables(text).tables["final-accuracy"]
    for row, name in zip(acc[1:], ("last", "best_val", "finetuned")):
        a = m["aggregate"][name]
        assert row[1] == f"{a['top1']['mean']:.2f} ± {a['top1']['std']:.2f}"
        assert row[2] == f"{a['top2']['mean']:.2f} ± {a['top2']['std']:.2f}"
    conf = figure(text, "fig-final-confusion")["data"]
    summed = np.sum([s["models"]["last"]["confusion"] for s in m["seeds"]], axis=0)
    assert conf[0]["z"] == summed.tolist()  # counts of the last-epoch model, summed over seeds
    assert np.allclose(conf[1]["z"], 100 * summed / summed.sum(1, keepdims=True))
    curves = figure(text, "fig-final-curves")["data"]
    # one legend entry per curve (solid: training, dotted: the fine-tune), seed 0's first
    assert [t["name"] for t in curves if t.get("showlegend", True)] == [
        "train acc",
        "val acc",
        "test acc",
        "train loss",
        "val loss",
    ]
    val = next(t for t in curves if t["name"] == "val acc")
    assert val["y"] == [h["val_acc"] for h in m["seeds"][0]["history"]] and val["line"]["dash"] == "solid"
    test = next(t for t in curves if t["name"] == "test acc")
    assert test["x"] == [2, 4, 6]  # only the tracked epochs
    ft = next(t for t in curves if t["name"] == "val acc" and t["line"]["dash"] == "dot")
    assert ft["x"] == [7, 8, 9]
    per_class = figure(text, "fig-final-per-class")["data"][0]  # last model's precision
    assert per_class["y"][0] == pytest.approx(
        statistics.fmean(s["models"]["last"]["per_class"]["angry"]["precision"] for s in m["seeds"])
    )
    assert len(re.findall(r'<img class="saliency" alt="[^"]*" src="data:image/png;base64,', text)) == 2
    # a synthetic study's numbers are never set beside FER2013's
    assert 'id="data-used"' in text and "not FER2013" in text
    ref = Tables(text).tables["reference-table"]
    assert not any(r[0].startswith("this study") for r in ref) and 'id="reference-synthetic"' in text
    assert any(r[1] == "73.28" and r[3].startswith("paper") for r in ref)  # results/reference/paper.csv
    assert not any("issue" in cell for r in ref for cell in r)  # papers and repositories only
    rec = json.loads((sdir / "study.json").read_text())
    rec["data"].update(format="folders", source="/data/fer2013")
    (sdir / "study.json").write_text(json.dumps(rec))
    text = write_report(sdir).read_text()
    assert "Data: /data/fer2013 (folders" in text and 'id="reference-synthetic"' not in text
    ref = Tables(text).tables["reference-table"]
    own = next(r for r in ref if r[0].startswith("this study (") and "fine-tuned" in r[0])
    top1 = m["aggregate"]["finetuned"]["top1"]
    assert own[1] == f"{top1['mean']:.2f} ± {top1['std']:.2f}"


def test_final_stage_against_the_paper_recipe(study, tmp_path):
    sdir = copy_study(study, tmp_path)
    m = make_final(sdir, baseline=True)
    text = write_report(sdir).read_text()
    rows = Tables(text).tables["final-baseline"]
    assert rows[0][:4] == ["model", "this study's configuration", "paper recipe", "difference (points)"]
    for row, name in zip(rows[1:], ("last", "best_val", "finetuned")):
        a, b = m["aggregate"][name]["top1"], m["baseline"]["aggregate"][name]["top1"]
        assert row[1] == f"{a['mean']:.2f} ± {a['std']:.2f}" and row[2] == f"{b['mean']:.2f} ± {b['std']:.2f}"
        assert row[3] == "+1.50"
    assert "mean ± std over 2 seeds" in text


def test_one_seed_shows_no_spread(study, tmp_path):
    sdir = copy_study(study, tmp_path)
    m = make_final(sdir, seeds=(0,), baseline=True)
    text = write_report(sdir).read_text()
    acc = Tables(text).tables["final-accuracy"]
    assert acc[1][1] == f"{m['aggregate']['last']['top1']['mean']:.2f}" and "±" not in "".join(acc[1])
    assert "±" not in "".join(Tables(text).tables["final-baseline"][1]) and "one seed" in text


def test_final_stage_running(study, tmp_path):
    sdir = copy_study(study, tmp_path)
    make_final(sdir, complete=False)
    with open(sdir / "final" / "history.csv") as fh:  # seed 1 interrupted after 4 epochs
        lines = fh.read().splitlines()
    keep = [l for l in lines if not l.startswith("1,")] + [l for l in lines if l.startswith("1,train,")][:4]
    (sdir / "final" / "history.csv").write_text("\n".join(keep) + "\n")
    text = write_report(sdir).read_text()
    assert 'id="final-state"' in text and "running or interrupted" in text
    assert "seed 0: 9, seed 1: 4" in text
    ids = figure_ids(text)
    assert "fig-final-curves" in ids and "fig-final-confusion" not in ids
    curves = figure(text, "fig-final-curves")["data"]
    assert [t["x"] for t in curves if t["name"] == "val acc" and t["line"]["dash"] == "solid"][1] == [1, 2, 3, 4]


def test_the_seeds_comparisons_from_trial_rows():
    """Grid studies like optimizer.yaml / scheduler.yaml / architecture.yaml: best value per group."""
    from fer_tune.report.html import Page
    from fer_tune.report.study import comparisons_section

    spec = {
        "metric": "val_acc",
        "mode": "max",
        "max_epochs": 4,
        "space": {
            "optimizer": {"type": "categorical"},
            "scheduler": {"type": "categorical"},
            "dropout": {"type": "categorical"},
            "model": {"type": "categorical"},
        },
    }
    rng = np.random.default_rng(1)
    combos = [
        (o, s, d, m)
        for o in ("sgd", "adam", "adagrad")
        for s in ("constant", "rlrp")
        for d in (0.2, 0.5)
        for m in ("vgg_variant", "resnet50")
    ]
    rows = [
        {
            "number": i,
            "status": "completed",
            "best_val_acc": round(float(rng.uniform(20, 70)), 4),
            "epochs": 4,
            "param_optimizer": o,
            "param_scheduler": s,
            "param_dropout": d,
            "param_model": m,
        }
        for i, (o, s, d, m) in enumerate(combos)
    ]
    rows.append({**rows[0], "number": 99, "best_val_acc": ""})  # running, no value yet: ignored
    # a trial stopped at epoch 2 that is the best of its dropout: its bar is hatched and says so
    rows.append({**rows[0], "number": 98, "best_val_acc": 99.0, "epochs": 2, "status": "pruned", "param_dropout": 0.9})
    page = Page("t")
    comparisons_section(page, spec, rows)
    text = "".join(page.sections[0][2])
    assert figure_ids(text) == ["fig-cmp-optimizer-scheduler", "fig-cmp-scheduler", "fig-cmp-dropout", "fig-cmp-model"]
    traces = figure(text, "fig-cmp-optimizer-scheduler")["data"]
    grouped = [t for t in traces if t["type"] == "bar"]
    assert [t["name"] for t in grouped] == ["constant", "rlrp"]
    valued = [r for r in rows if r["best_val_acc"] != ""]
    # every trial a point over its optimizer, beside its scheduler's bar
    points = {t["offsetgroup"]: t for t in traces if t["type"] == "scatter"}
    for sched, t in points.items():
        assert sorted(t["y"]) == sorted(r["best_val_acc"] for r in valued if r["param_scheduler"] == sched)
    for t in grouped:
        for opt, y in zip(t["x"], t["y"]):
            assert y == max(
                r["best_val_acc"] for r in valued if (r["param_optimizer"], r["param_scheduler"]) == (opt, t["name"])
            )
    for name in ("dropout", "model"):
        bars = figure(text, f"fig-cmp-{name}")["data"][0]
        for v, y, (trial, epochs, n, n_full), label, hatch in zip(
            bars["x"], bars["y"], bars["customdata"], bars["text"], bars["marker"]["pattern"]["shape"]
        ):
            group = [r for r in valued if str(r[f"param_{name}"]) == v]
            top = max(group, key=lambda r: r["best_val_acc"])
            assert (y, trial, epochs, n) == (top["best_val_acc"], top["number"], top["epochs"], len(group))
            assert n_full == sum(r["epochs"] == 4 for r in group) and f"n={n}" in label
            assert (hatch == "/") == (epochs < 4) == ("2 ep" in label)
    assert figure(text, "fig-cmp-dropout")["data"][0]["x"][-1] == "0.9"  # the hatched bar is there


def test_cli_report(study, tmp_path, capsys):
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(study["dir"]), "--out", str(out)]) == 0
    assert f"report: {out.resolve()}" in capsys.readouterr().out and out.stat().st_size > 500_000
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fer-tune: error:") and "is not a fer-tune study directory" in err
    # a directory takes the report as report.html; a path through a file is one line
    assert main(["report", str(study["dir"]), "--out", str(out.parent)]) == 0
    assert f"report: {out.parent.resolve() / 'report.html'}" in capsys.readouterr().out
    (tmp_path / "afile").write_text("")
    assert main(["report", str(study["dir"]), "--out", str(tmp_path / "afile" / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "afile is a file, not a directory" in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------------------
# a real browser
# ---------------------------------------------------------------------------------------------------------
PROBE = """<script>window.__errors=[];window.addEventListener('error',e=>window.__errors.push('error: '+e.message));
(function(){const c=console.error;console.error=function(...a){window.__errors.push('console.error: '+a.join(' '));
c.apply(console,a);};})();window.addEventListener('load',()=>setTimeout(()=>{const p=document.createElement('pre');
p.id='probe-errors';p.textContent=JSON.stringify(window.__errors);document.body.appendChild(p);},500));</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def need_chromium() -> None:
    """Skip where chromium is missing; fail instead under FER_TUNE_REQUIRE_BROWSER (CI)."""
    if chromium() is None:
        if os.environ.get("FER_TUNE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")


def run_chromium(url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    args = [
        chromium(),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=127.0.0.1:9",
        "--no-first-run",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,4200",
        "--virtual-time-budget=20000",
        *flags,
        url,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_report_renders_in_a_real_browser(study, tmp_path):
    need_chromium()
    sdir = copy_study(study, tmp_path)
    make_final(sdir)
    report = write_report(sdir)
    text = report.read_text()
    n_figures = len(figure_ids(text))
    assert n_figures >= 11  # 4 trials: no importance, no contour (too few completed trials)
    probe = report.with_name("probe.html")  # the same page with an error recorder first in <head>
    probe.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    r = run_chromium(probe.as_uri(), tmp_path / "profile", "--dump-dom")
    dom = r.stdout
    assert r.returncode == 0 and "</html>" in dom, r.stderr[-3000:]
    m = re.search(r'<pre id="probe-errors">(.*?)</pre>', dom, re.S)
    assert m, "the page did not finish loading"
    assert json.loads(html.unescape(m.group(1))) == []
    console = [l for l in r.stderr.splitlines() if "CONSOLE" in l]
    assert not [l for l in console if re.search(r"error|uncaught", l, re.I)], console
    # every plotly div has drawn its SVG
    divs = re.split(r'(?=<div id="fig-[\w-]+" class="plotly-graph-div[^"]*")', dom)[1:]
    assert len(divs) == n_figures
    for d in divs:
        assert 'class="main-svg"' in d, d[:80]  # from this div to the next one
    # the study name is text in the page, not an element
    assert '<img src="x"' not in dom and 'onerror="alert' not in dom
    assert html.escape(EVIL, quote=False) in dom
    shot = Path(os.environ.get("FER_TUNE_SCREENSHOT_DIR", tmp_path)) / "report.png"
    r = run_chromium(report.as_uri(), tmp_path / "profile2", f"--screenshot={shot}")
    assert r.returncode == 0 and shot.stat().st_size > 50_000, r.stderr[-3000:]


SECTION_PROBE = """<script>window.addEventListener('load',()=>setTimeout(()=>{const out={sections:[],legends:[],
height:document.documentElement.scrollHeight};for(const s of document.querySelectorAll('section')){const b=
s.getBoundingClientRect();out.sections.push([s.id,b.top+window.scrollY,b.height]);}for(const gd of document
.querySelectorAll('.plotly-graph-div')){const l=gd._fullLayout&&gd._fullLayout.legend;if(l&&l._height>l._effHeight+1)
out.legends.push(gd.id);}const p=document.createElement('pre');p.id='probe-layout';p.textContent=JSON.stringify(out);
document.body.appendChild(p);},500));</script>"""


@pytest.mark.parametrize("seeds", [(0,), (0, 1, 2)])
def test_every_section_is_drawn_in_a_screenshot_and_no_legend_overflows(study, tmp_path, seeds):
    """The page as a reader sees it: every section has content on screen, no figure's legend needs a scrollbar
    (plotly cuts the entries it cannot fit), with one seed and with several."""
    from PIL import Image

    need_chromium()
    sdir = copy_study(study, tmp_path)
    make_final(sdir, seeds=seeds, baseline=True)
    report = write_report(sdir)
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("<head>", "<head>" + SECTION_PROBE, 1))
    r = run_chromium(probe.as_uri(), tmp_path / "profile", "--dump-dom")
    m = re.search(r'<pre id="probe-layout">(.*?)</pre>', r.stdout, re.S)
    assert m, r.stderr[-3000:]
    layout = json.loads(html.unescape(m.group(1)))
    assert [s[0] for s in layout["sections"]] == [
        "decision",
        "summary",
        "optuna",
        "curves",
        "comparisons",
        "classes",
        "final",
        "reference",
    ]
    assert layout["legends"] == []
    height = int(layout["height"]) + 50
    shot = Path(os.environ.get("FER_TUNE_SCREENSHOT_DIR", tmp_path)) / f"report-{len(seeds)}-seeds.png"
    r = run_chromium(report.as_uri(), tmp_path / "profile2", f"--screenshot={shot}", f"--window-size=1280,{height}")
    assert r.returncode == 0, r.stderr[-3000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape[0] >= layout["height"]
    for name, top, h in layout["sections"]:
        band = img[int(top) : int(top + h)]
        assert h > 150 and band.std() > 20, (name, h, band.std())  # drawn: text and figures, not a blank band
        inked = (band < 200).any(axis=1).mean()  # the share of pixel rows with something dark on them
        assert inked > 0.15, (name, inked)


# every text box of the page (outside the boxes that scroll) and of each figure's SVG, checked pairwise for
# overlap, and the page's width against the window's
LAYOUT_PROBE = """<script>window.addEventListener('load',()=>setTimeout(()=>{const out={width:window.innerWidth,
scroll:document.documentElement.scrollWidth,html:[],svg:[]};function boxes(els){return els.map(e=>[e,
e.getBoundingClientRect()]).filter(([e,r])=>r.width>0&&r.height>0);}function hit(a,b){return Math.min(a.right,
b.right)-Math.max(a.left,b.left)>2&&Math.min(a.bottom,b.bottom)-Math.max(a.top,b.top)>2;}function pairs(t,f){for(let
i=0;i<t.length;i++)for(let j=i+1;j<t.length;j++){const[a,ra]=t[i],[b,rb]=t[j];if(!a.contains(b)&&!b.contains(a)&&
hit(ra,rb))f(a,b);}}pairs(boxes([...document.querySelectorAll('h1,h2,h3,p,li,th,td,summary,nav a,pre')].filter(e=>
!e.closest('.scroll')&&!e.closest('.plotly-graph-div'))),(a,b)=>out.html.push([a.textContent.slice(0,40),
b.textContent.slice(0,40)]));for(const gd of document.querySelectorAll('.plotly-graph-div'))pairs(boxes([...gd
.querySelectorAll('text')].filter(e=>e.textContent.trim())),(a,b)=>out.svg.push([gd.id,a.textContent.slice(0,30),
b.textContent.slice(0,30)]));const p=document.createElement('pre');p.id='probe-layout';p.textContent=JSON.stringify(
out);document.body.appendChild(p);},1500));</script>"""


def page_layout(report: Path, profile: Path, width: int) -> dict:
    """LAYOUT_PROBE's findings on `report` in chromium `width` px wide."""
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("<head>", "<head>" + LAYOUT_PROBE, 1))
    r = run_chromium(probe.as_uri(), profile, "--dump-dom", f"--window-size={width},1000")
    m = re.search(r'<pre id="probe-layout">(.*?)</pre>', r.stdout, re.S)
    assert m, r.stderr[-3000:]
    return json.loads(html.unescape(m.group(1)))


@pytest.mark.parametrize("width", [900, 1400])
def test_no_text_overlaps_and_nothing_runs_off_the_page_at_900_and_1400_px(study, tmp_path, width):
    need_chromium()
    sdir = copy_study(study, tmp_path)
    make_final(sdir, baseline=True)
    layout = page_layout(write_report(sdir), tmp_path / "profile", width)
    assert layout["width"] == width and layout["scroll"] <= width, layout["scroll"]  # no sideways scrolling
    assert layout["html"] == [] and layout["svg"] == [], (layout["html"][:10], layout["svg"][:10])


# ---------------------------------------------------------------------------------------------------------
# the page's size and its plotly.js
# ---------------------------------------------------------------------------------------------------------
def test_the_report_is_small_and_its_plotly_js_has_every_trace_type_it_draws(study, tmp_path):
    """plotly.js is the shipped bundle of the trace types the report draws, packed: a study with a final stage (and
    its saliency image) stays far under 2 MB (the full plotly.js alone is 4.8 MB), each layout template once."""
    from plotly.offline import get_plotlyjs

    sdir = copy_study(study, tmp_path)
    make_final(sdir, baseline=True)
    text = write_report(sdir).read_text()
    assert len(text.encode()) < 2_000_000
    bundle = PLOTLY_JS.read_text()
    banner = re.match(r"/\*\*\n\* plotly\.js v(\d+)\.[\d.]+: a bundle of the trace types ([\w ]+)\n", bundle)
    assert banner and set(banner.group(2).split()) == set(TRACE_TYPES)
    # the bundle is the plotly.js generation plotly.py writes figures for (else: rebuild it, plotlyjs/build.sh)
    assert banner.group(1) == re.search(r"plotly\.js v(\d+)\.", get_plotlyjs()[:200]).group(1)
    used = {t.get("type", "scatter") for f in figure_ids(text) for t in figure(text, f)["data"]}
    assert {"scatter", "bar", "heatmap"} <= used <= set(TRACE_TYPES), used  # (contour: tests/test_report_plots.py)
    # plotly's layout template once in the page, each figure naming it
    templates, _ = json.JSONDecoder().raw_decode(text, text.index("var T=") + len("var T="))
    assert len(templates) == 1 and "plot_bgcolor" in templates[0]["layout"] and '"template"' not in text
    assert set(re.findall(r'ferFigure\("fig-[\w-]+", (-?\d+),', text)) == {"0"}


def test_a_figure_of_a_trace_type_the_bundle_lacks_is_named_not_drawn():
    from fer_tune.report.html import Page

    page = Page("t")
    note = page.figure({"data": [{"type": "sunburst", "labels": ["a"]}], "layout": {}}, "sun")
    assert "sunburst" in note and 'id="fig-sun-missing"' in note and page.figures == []


def test_a_browser_without_decompression_says_so_in_each_figures_place(study, tmp_path):
    need_chromium()
    text = (study["dir"] / "report.html").read_text()
    old = tmp_path / "old-browser.html"
    old.write_text(text.replace("<head>", "<head><script>delete window.DecompressionStream;</script>", 1))
    r = run_chromium(old.as_uri(), tmp_path / "profile", "--dump-dom")
    assert r.returncode == 0 and "</html>" in r.stdout, r.stderr[-3000:]
    divs = re.findall(r'<div id="fig-[\w-]+" class="plotly-graph-div[^"]*"[^>]*>(.*?)</div>', r.stdout, re.S)
    assert len(divs) == len(figure_ids(text))
    assert all(d.startswith("This figure cannot be drawn: this browser cannot unpack plotly.js") for d in divs), divs


def test_the_final_stages_accuracy_charts_mark_chance_and_the_test_splits_majority_class(study, tmp_path):
    sdir = copy_study(study, tmp_path)
    m = make_final(sdir)
    text = write_report(sdir).read_text()
    rows = [sum(r) for r in m["seeds"][0]["models"]["finetuned"]["confusion"]]
    majority = 100.0 * max(rows) / sum(rows)
    for fig_id in ("fig-final-accuracy", "fig-final-curves"):
        layout = figure(text, fig_id)["layout"]
        ys = sorted({round(s["y0"], 6) for s in layout["shapes"] if s.get("y0") == s.get("y1")})
        assert ys == sorted({round(100 / 7, 6), round(majority, 6)}), (fig_id, ys)
        labels = [a["text"] for a in layout.get("annotations", [])]
        if fig_id == "fig-final-accuracy":  # bars that carry their numbers: the lines named in the legend
            labels = [t.get("name", "") for t in figure(text, fig_id)["data"]]
        assert "chance 14.3 %" in labels and any(t.startswith("majority class (") for t in labels), labels
