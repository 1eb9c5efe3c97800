"""The final stage and predict, run as the user runs them (CLI subprocesses over a real tiny study)."""

import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import time

import pytest
from conftest import SESSION_RAY_CPUS, cli_args, fer_tune, kill_at_pause, pausing

from fer_tune.common import EMOTIONS

FAST = ["--epochs", "3", "--finetune-epochs", "2", "--eval-every", "2", "--quiet"]


@pytest.fixture(scope="module")
def env(module_env):
    """The module's tests share one study, so one environment."""
    return module_env


@pytest.fixture(scope="module")
def study(small_study):
    return small_study


def faces(tmp_path, n=3):
    from PIL import Image

    from fer_tune.synthetic import generate_dataset_arrays

    images, labels, _ = generate_dataset_arrays(n, 11)
    paths = []
    for i, im in enumerate(images):  # any size: the model resizes to 48x48 grayscale
        p = tmp_path / f"face{i}.png"
        Image.fromarray(im).convert("RGB").resize((64 + 10 * i, 80)).save(p)
        paths.append(p)
    return paths


def test_final_two_seeds_end_to_end(env, study, tmp_path):
    r = fer_tune(env, "final", study, "--seeds", "2", *FAST)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    out = study / "final"
    rec = json.loads((out / "final.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    # the study's best trial by its metric
    with open(study / "trials.csv") as fh:
        rows = [x for x in csv.DictReader(fh) if x["best_val_acc"]]
    best = max(rows, key=lambda x: float(x["best_val_acc"]))
    assert rec["trial"]["number"] == int(best["number"])
    assert m["status"] == "complete" and m["protocol"] == "paper" and len(m["seeds"]) == 2
    assert rec["config"]["epochs"] == 3 and rec["finetune"] == {
        "epochs": 2,
        "lr": 1e-4,
        "scheduler": "cosine",
        "on": "train+val",
    }
    for s in m["seeds"]:
        assert s["status"] == "complete"
        assert [h["epoch"] for h in s["history"]] == [1, 2, 3] and len(s["finetune_history"]) == 2
        assert ["test_acc" in h for h in s["history"]] == [False, True, True]  # every 2 epochs and the last
        assert s["best_val_acc"] == max(h["val_acc"] for h in s["history"])
        for name in ("last", "best_val", "finetuned"):
            ev = s["models"][name]
            assert ev["crops"] == "ten" and sum(map(sum, ev["confusion"])) == ev["n"] > 0
            seed_dir = out / f"seed-{s['seed']}"
            with open(seed_dir / f"confusion_{name}.csv") as fh:
                table = [list(map(int, row[1:])) for row in list(csv.reader(fh))[1:]]
            assert table == ev["confusion"]
        assert (seed_dir / "saliency.png").stat().st_size > 0
        # the last-epoch model is the epoch-3 model: its test accuracy is the tracked one
        assert s["models"]["last"]["top1"] == pytest.approx(s["history"][-1]["test_acc"], abs=1e-6)
    for name in ("last", "best_val", "finetuned"):
        vals = [s["models"][name]["top1"] for s in m["seeds"]]
        agg = m["aggregate"][name]["top1"]
        assert agg["values"] == vals
        assert agg["mean"] == pytest.approx(statistics.fmean(vals))
        assert agg["std"] == pytest.approx(statistics.stdev(vals))
    with open(out / "history.csv") as fh:
        hist = list(csv.DictReader(fh))
    assert len(hist) == 2 * (3 + 2) and {h["phase"] for h in hist} == {"train", "finetune"}
    assert {int(h["seed"]) for h in hist} == {s["seed"] for s in m["seeds"]}

    # exports: the checkpoint and the torch.export program give the same logits
    import torch

    from fer_tune.train import load_checkpoint, model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(out / "model.pt"), torch.device("cpu"))
    program = torch.export.load(str(out / "model.pt2")).module()
    x = torch.rand(5, 1, 40, 40)
    with torch.no_grad():
        assert torch.allclose(model(x), program(x), atol=1e-4)
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"][0] == "angry" and m["exported_seed"] in rec["seeds"]
    # the model carries the data it was trained on and the crops of its test score (evaluate's defaults)
    study_data = json.loads((study / "study.json").read_text())["data"]
    for trained in (meta["data"], load_checkpoint(out / "model.pt")["data"]):
        assert trained["test_crops"] == "ten" and trained["fingerprint"] == study_data["fingerprint"]
        assert trained["format"] == "synthetic" and trained["source"] == study_data["source"]
    r = fer_tune(env, "evaluate", out, "--json")
    assert r.returncode == 0, r.stderr
    exported = next(x for x in m["seeds"] if x["seed"] == m["exported_seed"])["models"]["finetuned"]
    ev = json.loads(r.stdout)
    assert ev["crops"] == "ten" and ev["data"]["fingerprint"] == study_data["fingerprint"]
    assert ev["top1"] == pytest.approx(exported["top1"]) and ev["confusion"] == exported["confusion"]

    # the model card: the test score of the exported seed, where the model came from, its ONNX check
    assert meta["test"]["top1"] == pytest.approx(exported["top1"]) and set(meta["test"]["recall"]) == set(EMOTIONS)
    assert meta["study"] == "t" and meta["trial"]["number"] == rec["trial"]["number"]
    assert meta["preprocessing"]["crops"] == "TenCrop(40)" and meta["versions"]["torch"] == torch.__version__
    assert meta["onnx"]["status"] == "checked" and meta["onnx"]["max_abs_logit_diff"] <= 1e-4
    assert meta["onnx"]["opset"] >= 17 and (out / "model.onnx").is_file()
    # and what it costs: the parameters counted from the weights, the FLOPs counted, the latency measured here
    assert meta["cost"]["params"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert meta["cost"]["mflops"] > 0 and meta["cost"]["latency_ms"] > 0 and "fp32" in meta["cost"]["latency"]

    # predict: images of any size (faces crops here), JSON Lines; probabilities sum to one; model.onnx agrees
    paths = faces(tmp_path)
    r = fer_tune(env, "predict", out, *paths, "--json")
    assert r.returncode == 0, r.stderr
    preds = [json.loads(line) for line in r.stdout.splitlines()]
    assert [p["image"] for p in preds] == list(map(str, paths))
    for p in preds:
        assert len(p["faces"]) == 1
        f = p["faces"][0]
        assert sum(f["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert f["label"] == max(f["probabilities"], key=f["probabilities"].get)
    # a synthetic-data model says so, once, on stderr
    assert "trained on fer-tune's synthetic faces" in r.stderr and r.stderr.count("\n") == 1
    r = fer_tune(env, "predict", out / "model.onnx", *paths, "--json")
    assert r.returncode == 0, r.stderr
    for p, q in zip(preds, (json.loads(line) for line in r.stdout.splitlines())):
        assert q["faces"][0]["box"] == p["faces"][0]["box"]
        for e in EMOTIONS:
            assert q["faces"][0]["probabilities"][e] == pytest.approx(p["faces"][0]["probabilities"][e], abs=1e-5)
    r = fer_tune(env, "predict", out / "model.pt", paths[0])
    assert r.returncode == 0 and r.stdout.startswith(str(paths[0]))
    # an image or a CSV where the model goes: named as such, with the usage
    (tmp_path / "faces.csv").write_text("emotion,pixels,Usage\n0,1 2 3,Training\n")
    for wrong, kind in ((paths[0], "image"), (tmp_path / "faces.csv", "a text file")):
        r = fer_tune(env, "predict", wrong, paths[0])
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"{wrong} is not a fer-tune model: it is " in r.stderr and kind in r.stderr
        assert "usage: fer-tune predict MODEL IMAGE..." in r.stderr and "weights_only" not in r.stderr

    # the same command again: complete, nothing re-run; other settings: refused
    r = fer_tune(env, "final", study, "--seeds", "2", *FAST)
    assert r.returncode == 0 and "complete" in r.stdout
    r = fer_tune(env, "final", study, "--epochs", "5")
    assert r.returncode == 2 and "--epochs 5 (recorded: 3)" in r.stderr and "--out" in r.stderr


def start_final(env, study, out, stderr=subprocess.STDOUT):
    """`fer-tune final` of 12 + 2 epochs in its own session (a process group to signal or kill)."""
    args = cli_args(
        "final", study, "--out", out, "--epochs", "12", "--finetune-epochs", "2", "--eval-every", "4", "--quiet"
    )
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)


def wait_for_results(out, proc, lines):
    deadline = time.time() + 180
    while time.time() < deadline:
        res = list(out.glob("tune/*/result.json"))
        if res and len(res[0].read_text().splitlines()) >= lines:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    pytest.fail("the final stage reported nothing")


def test_one_driver_runs_a_final_stage_a_crash_is_continued_and_sighup_stops_it_like_ctrl_c(env, study, tmp_path):
    out = tmp_path / "final"
    marker = tmp_path / "paused"
    proc = start_final(pausing(env, marker), study, out)  # it holds still after 3 epochs, to be killed
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        r = fer_tune(env, "final", study, "--out", out, "--quiet")  # a second driver of the same final stage
        assert r.returncode == 2 and "the final stage is being run by `fer-tune final" in r.stderr, r.stderr
        assert f"(PID {proc.pid} on " in r.stderr and len(r.stderr.strip().splitlines()) == 1
        r = fer_tune(env, "status", study)
        assert r.returncode == 0 and "its final stage is being run now" not in r.stdout  # not STUDY/final
    finally:
        kill_at_pause(proc, marker)  # the driver and its Ray, as a crash would
    assert not (out / "metrics.json").exists()
    done = len(next(out.glob("tune/*/result.json")).read_text().splitlines())

    # the same command continues it; a closed terminal (SIGHUP) stops it as Ctrl-C does
    proc = start_final(env, study, out, stderr=subprocess.PIPE)
    try:
        wait_for_results(out, proc, done + 1)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGHUP)
        stdout, stderr = proc.communicate(timeout=90)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 129 and took < 60, (proc.returncode, took, stdout, stderr)
    assert f"final stage interrupted; continue it with:\n    fer-tune final {study} --out {out}" in stderr
    assert "SIGHUP received" in stderr and "Traceback" not in stderr and "PC: @" not in stderr
    assert (out / "history.csv").exists() and (out / ".lock").read_text() == ""

    r = fer_tune(env, "resume", out, "--quiet")  # `fer-tune resume DIR/final` continues it too
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in next(out.glob("tune/*/result.json")).read_text().splitlines()]
    # continued from checkpoints, not from scratch: the newest ones Tune's last saved state named
    assert max(x.get("resumed_at", 0) for x in rows) >= 1
    m = json.loads((out / "metrics.json").read_text())
    s = m["seeds"][0]
    assert s["status"] == "complete" and [h["epoch"] for h in s["history"]] == list(range(1, 13))
    assert [h["epoch"] for h in s["history"] if "test_acc" in h] == [4, 8, 12]
    with open(out / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 12 + 2


def test_final_bad_inputs(env, study, tmp_path):
    r = fer_tune(env, "final", tmp_path / "nope")
    assert r.returncode == 2 and "not a fer-tune study directory" in r.stderr and "Traceback" not in r.stderr
    for out, says in (
        (study / "tune", "needs a directory of its own"),
        (study, "needs a directory of its own"),
        (study.parent, "needs a directory of its own"),
        (tmp_path / "two words", "'two words'"),
    ):
        r = fer_tune(env, "final", study, "--out", out)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "two words").exists() and not (study / "tune" / "final.json").exists()
    r = fer_tune(env, "final", study, "--trial", "99", "--out", tmp_path / "f")
    assert r.returncode == 2 and "no trial 99" in r.stderr
    r = fer_tune(env, "final", study, "--trial", "99")  # beside the final stage STUDY/final holds: still the trial
    assert r.returncode == 2 and "no trial 99 (trials 0..2)" in r.stderr and "other settings" not in r.stderr
    r = fer_tune(env, "final", study, "--epochs", "0", "--out", tmp_path / "f")
    assert r.returncode == 2 and "--epochs must be > 0" in r.stderr
    # a study whose trials never finished: nothing to retrain
    empty = tmp_path / "empty"
    empty.mkdir()
    record = json.loads((study / "study.json").read_text())
    record["storage"] = f"sqlite:///{empty / 'optuna.db'}"
    (empty / "study.json").write_text(json.dumps(record))
    shutil.copy(study / "space.yaml", empty / "space.yaml")
    import optuna

    optuna.create_study(study_name=record["optuna_study"], storage=record["storage"], direction="maximize").ask()
    r = fer_tune(env, "final", empty)
    assert r.returncode == 2 and "no finished trial" in r.stderr and "Traceback" not in r.stderr
    # predict: unreadable files are named, nothing is printed for the others
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    from fer_tune.config import TrainConfig
    from fer_tune.models import create_model
    from fer_tune.train import save_checkpoint

    cfg = TrainConfig(width=0.0625)
    save_checkpoint(
        {"config": cfg.to_dict(), "model": create_model(cfg.model, width=cfg.width).state_dict()}, tmp_path / "model.pt"
    )
    r = fer_tune(env, "predict", tmp_path / "model.pt", bad, tmp_path / "missing.png")
    assert r.returncode == 2 and "bad.jpg: not a readable image" in r.stderr and "missing.png: no such file" in r.stderr
    r = fer_tune(env, "predict", tmp_path / "empty", bad)
    assert r.returncode == 2 and "holds no model.pt" in r.stderr


def test_final_with_the_paper_recipe_as_baseline(env, study, tmp_path):
    out = tmp_path / "fb"
    r = fer_tune(
        env,
        "final",
        study,
        "--out",
        out,
        "--baseline",
        "paper",
        "--epochs",
        "2",
        "--finetune-epochs",
        "1",
        "--eval-every",
        "2",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    rec = json.loads((out / "final.json").read_text())
    paper = rec["baselines"]["paper"]
    recipe = {
        "optimizer": "sgd_nesterov",
        "lr": 0.01,
        "momentum": 0.9,
        "scheduler": "rlrp",
        "factor": 0.75,
        "patience": 5,
        "dropout": 0.2,
        "weight_decay": 1e-4,
        "batch_size": 64,
        "erase_p": 0.5,
    }
    assert {k: paper[k] for k in recipe} == recipe
    for k in ("model", "width", "train_crops", "test_crops", "epochs", "seed", "protocol"):  # the study's
        assert paper[k] == rec["config"][k], k
    assert paper["width"] == 0.0625 and paper["epochs"] == 2
    m = json.loads((out / "metrics.json").read_text())
    b = m["baseline"]
    assert m["status"] == "complete" and b["name"] == "paper" and b["status"] == "complete"
    assert [s["seed"] for s in b["seeds"]] == [s["seed"] for s in m["seeds"]] == rec["seeds"]
    assert b["aggregate"].keys() == m["aggregate"].keys() == {"last", "best_val", "finetuned"}
    for name in ("last", "best_val", "finetuned"):
        assert b["aggregate"][name]["top1"]["values"] == [s["models"][name]["top1"] for s in b["seeds"]]
        assert b["difference"][name]["top1"] == pytest.approx(
            m["aggregate"][name]["top1"]["mean"] - b["aggregate"][name]["top1"]["mean"]
        )
    s = b["seeds"][0]
    assert [h["epoch"] for h in s["history"]] == [1, 2] and len(s["finetune_history"]) == 1
    assert s["history"] != m["seeds"][0]["history"]  # another recipe, another run
    base_dir = out / "baseline-paper" / f"seed-{s['seed']}"
    assert (base_dir / "metrics.json").is_file() and (base_dir / "confusion_finetuned.csv").is_file()
    assert not (base_dir / "model.pt").exists() and (out / "model.pt").is_file()  # only the study's model ships
    with open(out / "history.csv") as fh:
        hist = list(csv.DictReader(fh))
    assert sorted((h["arm"], h["phase"]) for h in hist) == sorted(
        [("paper", "train")] * 2 + [("paper", "finetune")] + [("winner", "train")] * 2 + [("winner", "finetune")]
    )
    assert "paper recipe top-1" in r.stdout and "difference" in r.stdout and "+-" not in r.stdout  # one seed
    # again: complete; a final stage started without a baseline refuses one, naming why
    r = fer_tune(env, "final", study, "--out", out, "--baseline", "paper")
    assert r.returncode == 0 and "complete" in r.stdout
    other = tmp_path / "plain"
    other.mkdir()
    rec["settings"]["baseline"] = None
    (other / "final.json").write_text(json.dumps(rec))
    r = fer_tune(env, "final", study, "--out", other, "--baseline", "paper")
    assert r.returncode == 2 and "--baseline paper (it was started without it)" in r.stderr
    r = fer_tune(env, "final", study, "--out", out, "--gpus-per-run", "0.5")  # a started stage keeps its resources
    assert r.returncode == 2 and "runs with 1 CPU and 0 GPU per run; it keeps them" in r.stderr
    assert m["baseline"]["difference_seeds"] == rec["seeds"]


def test_final_refuses_a_run_too_big_for_the_local_ray(env, study, tmp_path):
    r = fer_tune({**env, "CUDA_VISIBLE_DEVICES": ""}, "final", study, "--out", tmp_path / "big", "--gpus-per-run", "1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert (
        f"each run asks for 1 CPU and 1 GPU, but the local Ray on this machine has {SESSION_RAY_CPUS} CPU and 0 GPU"
        in r.stderr
    )
    assert "--gpus-per-run F" in r.stderr and not (tmp_path / "big").exists()


def test_a_study_and_its_final_stage_moved_elsewhere_are_read_and_continued_where_they_are(env, study, tmp_path):
    """`ray rsync-down` to a laptop, or `mv`: the study directory (with its final stage) works where it is now.
    Its study.json is written as an earlier release wrote it (its database by absolute path, the original's, which
    still exists): the copy reads and writes its own database."""
    a = tmp_path / "A" / "t"
    shutil.copytree(study, a, ignore=shutil.ignore_patterns("final*", "pbt", ".lock", "report.html"))
    rec = json.loads((a / "study.json").read_text())
    assert rec["storage"] == "sqlite:///optuna.db"  # recorded relative to the study directory
    (a / "study.json").write_text(json.dumps({**rec, "storage": f"sqlite:///{study / 'optuna.db'}"}))
    r = fer_tune(env, "final", a, *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((a / "final" / "final.json").read_text())
    assert final["study_dir"] == str(a)
    original = os.path.getmtime(study / "optuna.db")
    b = tmp_path / "B"
    (tmp_path / "A").rename(b)
    moved = b / "t"

    r = fer_tune(env, "status", moved)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    r = fer_tune(env, "report", moved)
    assert r.returncode == 0 and (moved / "report.html").is_file(), r.stderr
    r = fer_tune(env, "resume", moved / "final", "--quiet")  # a finished stage, found where it is now
    assert r.returncode == 0, r.stderr[-3000:]
    r = fer_tune(env, "extend", moved, "--num-samples", "1", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((moved / "study.json").read_text())["storage"] == "sqlite:///optuna.db"
    import optuna

    trials = optuna.load_study(study_name="t", storage=f"sqlite:///{moved / 'optuna.db'}").trials
    assert len(trials) == sum(run["num_samples"] for run in rec["runs"]) + 1
    assert os.path.getmtime(study / "optuna.db") == original  # the original study was never written
