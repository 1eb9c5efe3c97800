"""Trial checkpoints in a crash (fer_tune.tune.runtime.checkpoints, and the results trials.csv reads): which are kept, where a
restored trial continues from, and the epochs a killed driver lost. Plain files, no Ray runtime."""

import json
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from fer_tune.tune.runtime.checkpoints import pruner, restore, write_meta
from fer_tune.tune.study.outputs import read_results


def make_checkpoints(trial_dir, epochs, score=lambda e: float(e), first=0):
    paths = []
    for i, e in enumerate(epochs, start=first):
        d = trial_dir / f"checkpoint_{i:06d}"
        d.mkdir(parents=True)
        (d / "state.pt").write_text(f"state of epoch {e}")
        write_meta(d, {"epoch": e, "val_acc": score(e), "trial_id": "t1", "node": "n", "bad": [1]})
        paths.append(d)
    return paths


def feed(cb, paths, metrics):
    fs = pafs.LocalFileSystem()
    for p, m in zip(paths, metrics):
        cb.on_checkpoint(
            0, [], SimpleNamespace(trial_id="t1", last_result=m), SimpleNamespace(filesystem=fs, path=str(p))
        )


def test_the_pruner_keeps_the_latest_and_the_best_and_empties_the_rest(tmp_path):
    scores = {1: 30.0, 2: 50.0, 3: 40.0, 4: 41.0, 5: 42.0, 6: 43.0}
    cb = pruner(latest=3, score="val_acc", grace_s=0)
    paths = []
    for e, v in scores.items():  # each checkpoint is written, then reported
        paths += make_checkpoints(tmp_path / "trial", [e], score=scores.get, first=len(paths))
        feed(cb, paths[-1:], [{"epoch": e, "val_acc": v}])
    intact = [p.name for p in paths if (p / "state.pt").exists()]
    assert intact == [
        "checkpoint_000001",
        "checkpoint_000003",
        "checkpoint_000004",
        "checkpoint_000005",
    ]  # best, latest 3
    for p in paths:  # emptied ones keep their directory and the epoch's result, nothing else
        assert p.is_dir() and [f.name for f in p.iterdir() if f.name.startswith("result-")]
    assert json.loads((paths[0] / "result-1.json").read_text()) == {
        "epoch": 1,
        "val_acc": 30.0,
        "trial_id": "t1",
        "node": "n",
    }


def test_the_pruner_waits_until_a_newer_checkpoint_is_old_enough(tmp_path):
    cb = pruner(latest=1, grace_s=60)
    paths = []
    for e in range(1, 6):
        paths += make_checkpoints(tmp_path / "trial", [e], first=len(paths))
        feed(cb, paths[-1:], [{"epoch": e}])
    assert all((p / "state.pt").exists() for p in paths)  # Tune's saved state may still name any of them


def test_the_pruner_of_a_restarted_driver_knows_the_older_checkpoints_and_keeps_pinned_ones(tmp_path):
    paths = make_checkpoints(tmp_path / "trial", [1, 2, 3, 4])
    (paths[1] / "result-2.json").write_text(json.dumps({"epoch": 2, "keep": 1e6 + 2}))  # a snapshot
    cb = pruner(latest=1, pinned=lambda m: m.get("keep", 0) >= 1e6, grace_s=0)
    feed(cb, paths[3:], [{"epoch": 4}])  # first sight of the trial: 1-3 were written before the restart
    assert [p.name for p in paths if (p / "state.pt").exists()] == ["checkpoint_000001", "checkpoint_000003"]


def test_restore_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    paths = make_checkpoints(tmp_path / "trial", [1, 2, 3, 4])
    fs = pafs.LocalFileSystem()
    load = lambda d: (d / "state.pt").read_text()  # noqa: E731
    assert restore(SimpleNamespace(filesystem=fs, path=str(paths[1])), load) == "state of epoch 2"
    (paths[1] / "state.pt").unlink()  # emptied by the pruner after the saved state named it
    (paths[3] / "state.pt").write_text("")  # cut short by a kill
    assert (
        restore(
            SimpleNamespace(filesystem=fs, path=str(paths[1])),
            lambda d: (d / "state.pt").read_text() or (_ for _ in ()).throw(EOFError("empty")),
        )
        == "state of epoch 3"
    )
    for p in paths:
        (p / "state.pt").unlink(missing_ok=True)
    assert restore(SimpleNamespace(filesystem=fs, path=str(paths[1])), load) is None  # the trial starts over


def test_epochs_missing_from_result_json_come_from_the_checkpoints(tmp_path):
    exp = tmp_path / "tune"
    trial = exp / "_trial_t1_0_lr=0.1"
    make_checkpoints(trial, [1, 2, 3, 4])
    lines = [{"trial_id": "t1", "epoch": e, "val_acc": 10.0 * e, "training_iteration": e} for e in (1, 2)]
    (trial / "result.json").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"trial_id": "t1", "ep')
    rows = read_results([exp])["t1"]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["val_acc"] for r in rows] == [10.0, 20.0, 3.0, 4.0]  # result.json's lines win where it has them
    # a trial whose result.json never reached the storage
    (trial / "result.json").unlink()
    assert [r["epoch"] for r in read_results([exp])["t1"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("n", [0, 3])
def test_write_meta_names_the_epoch(tmp_path, n):
    write_meta(tmp_path, {"epoch": n, "val_acc": 1.5})
    assert json.loads((tmp_path / f"result-{n}.json").read_text())["val_acc"] == 1.5


def test_a_tune_state_another_release_wrote_is_refused_in_one_line(tmp_path):
    """Tune pickles the searcher and the trainable by name: a state that names classes this release does not
    have is a clear refusal, not a traceback."""
    from fer_tune.common import FerTuneError
    from fer_tune.tune.runtime.session import restore_tuner

    (tmp_path / "tuner.pkl").write_bytes(b"cfer_tune.study\n_searcher_class\n.")  # a 0.2 study's searcher
    with pytest.raises(FerTuneError, match=r"written by fer-tune 0\.2\.0 and cannot be read by fer-tune .*release"):
        restore_tuner(str(tmp_path), lambda config: None, "0.2.0")


def _finished_trial(exp, tid, values, cb=None, *, status="completed"):
    """A trial's directory with a checkpoint per epoch (`values`: its val_acc by epoch), fed to `cb` as Tune would:
    each epoch's checkpoint and result, then its completion."""
    trial_dir = exp / f"study_trial_{tid}_1_x=1"
    fs = pafs.LocalFileSystem()
    for i, v in enumerate(values):
        d = trial_dir / f"checkpoint_{i:06d}"
        d.mkdir(parents=True)
        (d / "state.pt").write_text("weights")
        row = {"epoch": i + 1, "val_acc": v, "trial_id": tid, "status": status if i == len(values) - 1 else "running"}
        write_meta(d, row)
        with open(trial_dir / "result.json", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if cb is not None:
            trial = SimpleNamespace(trial_id=tid, last_result=row)
            cb.on_checkpoint(0, [], trial, SimpleNamespace(filesystem=fs, path=str(d)))
            cb.on_trial_result(0, [], trial, row)
    if cb is not None:
        cb.on_trial_complete(0, [], SimpleNamespace(trial_id=tid, last_result=row))
    return trial_dir


def _weights(trial_dir):
    return [p.name for p in sorted(trial_dir.glob("checkpoint_*")) if (p / "state.pt").exists()]


def test_finished_trials_keep_only_what_can_matter_again(tmp_path):
    from fer_tune.tune.study.footprint import FinishedCheckpoints

    exp = tmp_path / "tune"
    cb = FinishedCheckpoints(keep=2, metric="val_acc", mode="max", max_epochs=3, history_dirs=[], grace_s=0)
    a = _finished_trial(exp, "a", [20, 40, 30], cb)  # completed, best epoch 2
    p = _finished_trial(exp, "p", [10], cb, status="pruned")  # stopped early by ASHA
    d = _finished_trial(exp, "d", [35, 36, float("nan")], cb, status="diverged")
    b = _finished_trial(exp, "b", [50, 45, 44], cb)  # completed, best epoch 1
    assert _weights(a) == ["checkpoint_000001"] and _weights(b) == ["checkpoint_000000"]
    assert _weights(p) == [] and _weights(d) == []
    c = _finished_trial(exp, "c", [41, 42, 60], cb)  # a better one pushes `a` out of the top 2
    assert _weights(c) == ["checkpoint_000002"] and _weights(b) == ["checkpoint_000000"] and _weights(a) == []
    for trial_dir in (a, p, d, b, c):  # emptied checkpoints keep their directory and the epoch's result
        assert all(list(ck.glob("result-*.json")) for ck in trial_dir.glob("checkpoint_*"))
    assert cb.emptied == 2 + 1 + 3 + 2 + 2 + 1

    # within the grace period nothing goes (Tune's saved state may not say the trial finished yet); at the end of
    # the run everything due goes
    cb = FinishedCheckpoints(keep=1, metric="val_acc", mode="max", max_epochs=3, history_dirs=[], grace_s=60)
    e = _finished_trial(tmp_path / "tune2", "e", [1, 2, 3], cb)
    f = _finished_trial(tmp_path / "tune2", "f", [5], cb, status="pruned")
    assert len(_weights(e)) == 3 and len(_weights(f)) == 1
    cb.on_experiment_end([])
    assert _weights(e) == ["checkpoint_000002"] and _weights(f) == []


def test_a_resumed_study_reads_the_trials_earlier_drivers_finished(tmp_path):
    from fer_tune.tune.study.footprint import FinishedCheckpoints

    exp = tmp_path / "tune"
    old = {"g": _finished_trial(exp, "g", [30, 31, 32]), "h": _finished_trial(exp, "h", [70], status="pruned")}
    old["r"] = _finished_trial(exp, "r", [10, 11])  # running when its driver stopped: a resume continues it
    old["x"] = _finished_trial(exp, "x", [12])  # errored: a resume retries it from its last checkpoint
    status = {"g": "TERMINATED", "h": "TERMINATED", "r": "RUNNING", "x": "ERROR"}
    state = {
        "trial_data": [
            [json.dumps({"trial_id": t, "status": s, "relative_logdir": old[t].name, "config": {}}), "{}"]
            for t, s in status.items()
        ]
    }
    (exp / "experiment_state-2026-12-06_10-00-00.json").write_text(json.dumps(state))
    cb = FinishedCheckpoints(keep=1, metric="val_acc", mode="max", max_epochs=3, history_dirs=[str(exp)], grace_s=60)
    i = _finished_trial(exp, "i", [40, 50, 45], cb)  # better than g: g's best goes too
    cb.on_experiment_end([])
    assert _weights(old["g"]) == [] and _weights(old["h"]) == [] and _weights(i) == ["checkpoint_000001"]
    assert len(_weights(old["r"])) == 2 and len(_weights(old["x"])) == 1


def test_a_completed_trial_stopped_at_its_first_result_after_a_restart_keeps_its_best(tmp_path):
    """It finished after Tune's last saved state; the resume restored it from an older checkpoint and stopped it
    at its first result (the study holds it as completed): still a completed trial, with its best epoch."""
    from fer_tune.tune.study.footprint import FinishedCheckpoints

    exp = tmp_path / "tune"
    done = _finished_trial(exp, "k", [30, 60, 50])  # epochs 1-3 under the killed driver
    cb = FinishedCheckpoints(keep=1, metric="val_acc", mode="max", max_epochs=3, history_dirs=[], grace_s=0)
    fs = pafs.LocalFileSystem()
    row = {"epoch": 2, "val_acc": 55, "trial_id": "k", "status": "running"}  # again from epoch 1's checkpoint
    trial = SimpleNamespace(trial_id="k", last_result=row)
    cb.on_checkpoint(0, [], trial, SimpleNamespace(filesystem=fs, path=str(done / "checkpoint_000001")))
    cb.on_trial_result(0, [], trial, row)
    cb.on_trial_complete(0, [], trial)
    other = _finished_trial(exp, "m", [40, 41, 42], cb)  # worse than k's 60: k stays the one kept
    assert _weights(done) == ["checkpoint_000001"] and _weights(other) == []


def test_a_trials_memory_is_read_at_most_every_memory_s(monkeypatch):
    """Each epoch's result carries the trial process's memory; reading /proc/self/smaps costs tens of milliseconds
    once PyTorch is loaded, so a reading is reused for MEMORY_S seconds."""
    from fer_tune.tune.runtime import trial

    clock = [1000.0]
    reads = []
    real = trial._read_memory
    monkeypatch.setattr(trial.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(trial, "_read_memory", lambda: reads.append(clock[0]) or real())
    monkeypatch.setattr(trial, "_LAST_READING", [])
    first = trial.memory_mb()
    assert first["rss_mb"] > 0 and 0 < first["pss_mb"] <= first["rss_mb"] and first["uss_mb"] <= first["rss_mb"]
    clock[0] += trial.MEMORY_S - 0.5
    first["rss_mb"] = -1.0  # a caller's change is not kept
    assert trial.memory_mb()["rss_mb"] > 0 and reads == [1000.0]
    clock[0] += 0.5
    trial.memory_mb()
    assert reads == [1000.0, 1000.0 + trial.MEMORY_S]
