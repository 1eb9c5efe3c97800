"""fer-tune's progress lines (fer_tune.tune.runtime.progress): one line per trial event, with trials done of N, the best
so far and an ETA once a trial has finished; a failed trial names its error."""

import logging
from types import SimpleNamespace

from fer_tune.tune.runtime.progress import TrialProgress


def trial(tid, status="RUNNING", config=None, last=None, error_file=None):
    return SimpleNamespace(
        trial_id=tid, status=status, config=config or {}, last_result=last or {}, error_file=error_file
    )


def test_one_line_per_event_with_counts_best_so_far_and_eta(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="fer_tune")
    names = {"a": "trial 0", "b": "trial 1"}

    def ended(result, epochs):
        return f"pruned at epoch {epochs}" if epochs < 4 else "completed"

    p = TrialProgress(
        metric="val_acc", mode="max", total=3, epochs={"": 4}, name=lambda t: names[t.trial_id], ended=ended
    )
    a = trial("a", config={"optimizer": "adam", "lr": 0.0031234})
    b = trial("b", config={"optimizer": "sgd_nesterov", "lr": 0.02})
    p.on_trial_start(0, [a], a)
    p.on_trial_start(0, [a, b], b)
    a.last_result = {"epoch": 1, "val_acc": 30.0, "best_val_acc": 30.0}
    b.last_result = {"epoch": 1, "val_acc": 41.5, "best_val_acc": 41.5}
    p.on_trial_result(0, [a, b], a, a.last_result)
    p.on_trial_result(0, [a, b], b, {"epoch": 2, "val_acc": 44.0, "best_val_acc": 44.0})  # b leads: says so
    a.status = "TERMINATED"
    p.on_trial_complete(0, [a, b], a)
    err = tmp_path / "error.txt"
    err.write_text("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n")
    b.error_file, b.status = str(err), "ERROR"
    p.on_trial_error(0, [a, b], b)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "trial 0 started: optimizer=adam, lr=0.003123  [0/3 done, 1 running]"
    assert lines[1] == "trial 1 started: optimizer=sgd_nesterov, lr=0.02  [0/3 done, 2 running]"
    assert lines[2] == "trial 0 epoch 1/4: val_acc 30.00 (best so far 41.50, trial 1)"
    assert lines[3] == "trial 1 epoch 2/4: val_acc 44.00 (the best so far)"
    assert lines[4].startswith("trial 0 pruned at epoch 1  [1/3 done, 1 running, ETA ~") and lines[4].endswith(" min]")
    assert lines[5].startswith(
        f"trial 1 failed: RuntimeError: CUDA out of memory (details: {err})  [2/3 done, 0 running"
    )
    assert caplog.records[5].levelno == logging.WARNING and len(lines) == 6


def test_the_final_stage_names_seeds_and_phases(caplog):
    caplog.set_level(logging.INFO, logger="fer_tune")
    p = TrialProgress(
        metric="val_acc",
        mode="max",
        total=1,
        epochs={"train": 12, "finetune": 2},
        name=lambda t: f"seed {t.config['seed']}",
        ended=lambda r, e: "finished",
        params=False,
        best=False,
    )
    s = trial("s", config={"seed": 0})
    p.on_trial_start(0, [s], s)
    p.on_trial_result(0, [s], s, {"epoch": 1, "phase": "finetune", "val_acc": 50.0})
    p.on_trial_result(0, [s], s, {"epoch": 2, "phase": "finetune", "status": "done", "val_acc": 50.0})  # not an epoch
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["seed 0 started  [0/1 done, 1 running]", "seed 0 epoch 1/2 (finetune): val_acc 50.00"]


def test_tunes_tables_only_with_verbose_and_one_progress_callback_after_a_restore(tmp_path, monkeypatch):
    """set_output on a Tuner (a restored one keeps the RunConfig it was saved with): one progress callback, one stop
    on a full disk (first); the test hook that pauses a driver is attached only while its variable is set."""
    from ray import tune

    from fer_tune.tune.runtime.internals import tuner_run_config
    from fer_tune.tune.runtime.progress import PAUSE_ENV, FullDiskStops, PauseAfter
    from fer_tune.tune.runtime.session import set_output

    old = TrialProgress(metric="m", mode="max", total=1, epochs={"": 1}, name=str, ended=lambda r, e: "")
    new = TrialProgress(metric="m", mode="max", total=1, epochs={"": 1}, name=str, ended=lambda r, e: "")
    tuner = tune.Tuner(
        lambda config: None,
        run_config=tune.RunConfig(
            name="t", storage_path=str(tmp_path), verbose=3, callbacks=[old, FullDiskStops()]
        ),  # as a run of this release saved it
    )
    set_output(tuner, "progress", new, str(tmp_path / "t"))
    rc = tuner_run_config(tuner)
    assert rc.verbose == 0 and [type(c) for c in rc.callbacks] == [FullDiskStops, TrialProgress]
    assert rc.callbacks[1] is new
    monkeypatch.setenv(PAUSE_ENV, f"3:{tmp_path / 'paused'}")
    set_output(tuner, "quiet", new, str(tmp_path / "t"))
    assert rc.verbose == 0 and [type(c) for c in rc.callbacks] == [FullDiskStops, PauseAfter]
    assert rc.callbacks[1].n == 3
    monkeypatch.delenv(PAUSE_ENV)
    set_output(tuner, "tables", new, str(tmp_path / "t"))
    assert rc.verbose == 1 and [type(c) for c in rc.callbacks] == [FullDiskStops]


def test_only_the_first_driver_to_reach_the_pause_point_pauses(tmp_path, monkeypatch):
    """The pause hook's marker is written once: a later driver started with the same environment (the next
    allocation of a SLURM job, which keeps the environment it was submitted with) runs through."""
    import time

    from fer_tune.tune.runtime import progress

    monkeypatch.setattr(progress, "state_saved_at", lambda exp_dir: time.time() + 1)  # Tune saved after the result
    waits = []
    monkeypatch.setattr(progress.signals, "received", lambda: waits.append(1) or True)  # a signal ends the pause
    marker = tmp_path / "paused"
    for driver in range(2):
        hook = progress.PauseAfter(f"2:{marker}", str(tmp_path))
        for _ in range(3):
            hook.on_trial_result(0, [], None, {})
            hook.on_step_end(0, [])
        assert marker.read_text() == "2" and len(waits) == 1, driver  # the first paused, the second did not


def test_ray_warnings_are_counted_in_the_log_that_holds_them(caplog, tmp_path):
    """One Ray for two stages (the demo's sweep, then its final stage): each stage's "Ray logged N warning(s)"
    line counts the warnings in its own ray.log, not those an earlier stage's log already holds."""
    from fer_tune.tune.runtime import session

    caplog.set_level(logging.INFO, logger="fer_tune")
    ray_log = session._RayLog()
    session._RAY_LOG.append(ray_log)
    ray = logging.getLogger("ray.test_progress")
    try:
        ray.addHandler(ray_log)
        ray.propagate = False
        ray.warning("token authentication is enabled")  # at Ray's start, before the first stage names its log
        session.ray_log_to(tmp_path / "study.log")
        session.say_ray_log()
        ray.warning("a trial's warning")
        session.ray_log_to(tmp_path / "final.log")  # the next stage, on the same Ray
        session.say_ray_log()
        ray.warning("one in the final stage")
        session.say_ray_log()
    finally:
        ray.removeHandler(ray_log)
        ray_log.close()
        session._RAY_LOG.remove(ray_log)
    said = [r.getMessage() for r in caplog.records if "Ray logged" in r.getMessage()]
    assert said == [
        f"Ray logged 1 warning(s) on the way: {tmp_path / 'study.log'}",
        f"Ray logged 1 warning(s) on the way: {tmp_path / 'final.log'}",
    ], said
    assert (tmp_path / "study.log").read_text().count("WARNING") == 2
    assert (tmp_path / "final.log").read_text().count("WARNING") == 1
