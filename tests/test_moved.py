"""A stage an earlier release started still resumes after the study layer became packages: Tune pickled its
searcher, scheduler and callbacks under the old flat module names (fer_tune.tune.searcher, fer_tune.tune.pbt, ...).
The files in tests/data/pickled-by-0.x were written by fer-tune at commit 4150a19 (a study killed mid-sweep, a
final stage and a PBT stage killed mid-run): Tune's tuner.pkl of each, and the searcher's state from the study's
experiment state."""

import pickle
from pathlib import Path

import pytest

import fer_tune.tune  # noqa: F401  (installs the old names)
from fer_tune.tune.moved import MODULES, NAMES, moved_attribute

DATA = Path(__file__).parent / "data" / "pickled-by-0.x"


def test_tune_state_pickled_by_the_flat_release_loads_into_the_new_classes(tmp_path, monkeypatch):
    import optuna

    from fer_tune.tune.pbt.driver import Clip
    from fer_tune.tune.study import record
    from fer_tune.tune.study.searcher import FinishedInStudy, NumpyTBXLoggerCallback, StudySearch

    # the searcher reconnects to its study's database when unpickled: the pickle names the one where the study was
    # made (/tmp/legacy/results/cut); a resume reads it in the study's directory where it is now, as here
    sdir = tmp_path / "results" / "cut"
    sdir.mkdir(parents=True)
    optuna.create_study(study_name="cut", storage=f"sqlite:///{sdir / record.OWN_DB}")
    monkeypatch.setattr(record, "_HERE", [sdir])
    study = pickle.loads((DATA / "study-tuner.pkl").read_bytes())
    assert record.located(study["_tune_config"].search_alg._storage_ref) == f"sqlite:///{sdir / record.OWN_DB}"
    assert type(study["_tune_config"].search_alg) is StudySearch
    assert type(study["_run_config"].stop) is FinishedInStudy
    assert any(type(c) is NumpyTBXLoggerCallback for c in study["_run_config"].callbacks)
    assert type(pickle.loads((DATA / "study-searcher.pkl").read_bytes())) is FinishedInStudy
    final = pickle.loads((DATA / "final-tuner.pkl").read_bytes())
    assert [type(c).__name__ for c in final["_run_config"].callbacks] == ["Pruner"]
    pbt = pickle.loads((DATA / "pbt-tuner.pkl").read_bytes())
    assert type(pbt["_tune_config"].scheduler._custom_explore_fn) is Clip


@pytest.mark.parametrize(("old", "name"), sorted(NAMES))
def test_names_that_left_their_module_resolve_under_the_old_one(old, name):
    new = __import__(NAMES[(old, name)], fromlist=[name])
    assert pickle.loads(f"c{old}\n{name}\n.".encode()) is getattr(new, name)


def test_every_old_module_imports_and_unknown_names_stay_unknown():
    import importlib

    for old, new in MODULES.items():
        module = importlib.import_module(old)
        public = [n for n in vars(importlib.import_module(new)) if not n.startswith("_")]
        assert all(getattr(module, n) is getattr(importlib.import_module(new), n) for n in public), old
    with pytest.raises(AttributeError):
        moved_attribute("fer_tune.tune.searcher", "NoSuchThing")
    with pytest.raises(ImportError):
        importlib.import_module("fer_tune.tune.no_such_module")
