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
