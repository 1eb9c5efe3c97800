"""`fer-tune demo --quick` end to end: sweep -> final stage -> report, as README's main command runs it."""

import csv
import json
import re

from conftest import fer_tune


def test_demo_quick_end_to_end(tmp_path, env):
    out = tmp_path / "demo"
    r = fer_tune(env, "demo", "--out", out, "--quick", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for step in ("[1/3] sweep", "[2/3] final stage", "[3/3] report"):  # progress: stderr
        assert step in r.stderr
    for result in ("best: trial", "test top-1", "open the report", "fer-tune dashboard"):  # results: stdout
        assert result in r.stdout
    # how to get the dashboard, and that the model is no model for real photos
    assert "pip install -e '.[dashboard]'" in r.stdout and "it learnt synthetic faces" in r.stdout
    # the space is the demo's own, named as such (no temporary file that is gone)
    assert json.loads((out / "study.json").read_text())["space_file"].startswith("the demo's own space")
    # progress in fer-tune's words, one line per event; Tune's tables and Ray's notes kept out of the terminal
    assert re.search(r"^trial \d+ started: optimizer=", r.stderr, re.M), r.stderr[-3000:]
    assert re.search(r"^trial \d+ (completed: best val_acc|pruned at epoch)", r.stderr, re.M)
    assert re.search(r"^seed 0 epoch \d+/\d+ \(finetune\): val_acc", r.stderr, re.M)
    assert "== Status ==" not in r.stdout + r.stderr and "Tuner.restore" not in r.stderr
    assert (out / "ray.log").is_file() and (out / "final" / "ray.log").is_file()
    with open(out / "trials.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {x["param_optimizer"] for x in rows} <= {"sgd_nesterov", "adam", "adamw"}
    m = json.loads((out / "final" / "metrics.json").read_text())
    assert m["status"] == "complete"
    assert m["aggregate"]["finetuned"]["top1"]["mean"] > 100 / 7 + 3  # it learned: above chance
    html = (out / "report.html").read_text()
    assert "demo" in html and "Final stage" in html
    assert len(html.encode()) < 2_000_000  # plotly.js inside it, packed (the whole plotly.js alone is 4.8 MB)
    # again: everything is there, nothing is re-run
    r = fer_tune(env, "demo", "--out", out, "--quick")
    assert r.returncode == 0 and "the study is complete" in r.stderr and "final stage is complete" in r.stderr
