"""The skeleton every stage's driver (the study's, the final stage's, the PBT stage's) is built on: how a command
runs it (RunOptions), its trial function as Tune runs it with its resources (trainable), Tune's run settings and
failure policy (run_config), the message and exit code of an interrupted stage (stopped), and, for the stages
after the study, the record their directory holds (stage_record, read_record), the refusal of options that
contradict it and of a start while the study still runs, and their Tune experiment, new or continued."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from ... import __version__
from ...common import FerTuneError, code_revision, write_json
from . import signals, storage
from .layout import restorable, set_aside
from .lock import describe, holder
from .session import restore_tuner, set_pending_trials, tune_verbosity

log = logging.getLogger(__name__)


class StageRecord(TypedDict, total=False):
    """What every stage after the study records first (stage_record): final.json and pbt.json begin with it."""

    study: str
    study_dir: str
    protocol: str
    protocol_note: str
    resources: dict  # {"cpu": float, "gpu": float} per run
    ray_storage: str
    created: str
    wall_seconds: float
    code: str
    fer_tune: str


FAILURES = 2  # a failed trial (a crash, a lost node) is retried this often from its last checkpoint


@dataclass(frozen=True)
class RunOptions:
    """How a command runs any stage: the Ray cluster to join (None: a local Ray with `num_cpus` CPUs), what it
    prints (fer_tune.tune.runtime.session.OUTPUTS), `force` (run although the study's inputs changed or a lock was
    recorded on another machine), the MLflow tracking URI (None: the recorded one) and `loader` ((data source,
    protocol) -> FerData, with the command's read options)."""

    loader: Callable[[str, str], Any]
    address: str | None = None
    output: str = "progress"
    num_cpus: int | None = None
    force: bool = False
    mlflow: str | None = None


def weight(resources: dict) -> float:
    """Device-seconds per second of a trial's training: its GPUs, else its CPUs."""
    return resources["gpu"] or resources["cpu"]


def threads(resources: dict) -> int:
    """torch's CPU threads in a trial that does not set them: one per CPU it holds."""
    return max(1, int(resources["cpu"]))


def trainable(fn: Callable, resources: dict, **params: Any) -> Any:
    """`fn` as Tune runs it: `params` put in Ray's object store once (the dataset), `resources` per trial."""
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(fn, **params), resources={"cpu": resources["cpu"], "gpu": resources["gpu"]}
    )


def run_config(name: str, storage_path: str, output: str, callbacks: list, **more: Any) -> Any:
    """Tune's RunConfig of a stage: its experiment `name` in `storage_path`, the verbosity `output` asks for, the
    failure policy (FAILURES retries from the last checkpoint) and the stage's callbacks."""
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        verbose=tune_verbosity(output),
        failure_config=tune.FailureConfig(max_failures=FAILURES),
        callbacks=callbacks,
        **more,
    )


def stopped(what: str, command: str) -> int:
    """A stage cut short (Ctrl-C, SIGTERM, SIGHUP): says how to continue it; the exit code of the signal."""
    log.warning("\n%s interrupted; continue it with:\n    %s", what, command)
    return signals.exit_code()


def refuse_while_the_study_runs(sdir: Path, why: str) -> None:
    """FerTuneError when a driver runs the study now (its trials are not settled): `why` finishes the sentence."""
    running = holder(sdir)
    if running:
        raise FerTuneError(f"{sdir}: the study is being run by {describe(running)}, so {why}")


def stage_record(sdir: Path, record: dict, data: Any, resources: dict, ray_dir: str, out: Path) -> StageRecord:
    """What every stage after the study records first: the study, the data's split protocol, the resources per
    run, its Ray storage (beside the study's own experiments on a shared storage, else in `out`), when, and the
    code that made it."""
    return {
        "study": record["name"],
        "study_dir": str(sdir),
        "protocol": data.protocol,
        "protocol_note": data.protocol_note,
        "resources": resources,
        "ray_storage": storage.join(storage.study_storage(sdir, record), ray_dir)
        if record.get("ray_storage")
        else str(out),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_seconds": 0.0,
        "code": code_revision(),
        "fer_tune": __version__,
    }


def read_record(path: Path, what: str) -> Any:
    """The stage's record (final.json, pbt.json), None when there is none; a damaged one is refused. Its paths
    are where the stage is now: a stage directory moved or copied with its experiment (`tune/` beside the record)
    runs from there, and one inside a study directory belongs to that study."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FerTuneError(f"{path} is damaged ({exc}); remove {path.parent} to start {what} again") from None
    return located(rec, path.parent)


def located(rec: Any, out: Path) -> Any:
    """A stage's record with its paths where the stage directory `out` is now (see read_record)."""
    out = out.resolve()
    ray_storage = rec.get("ray_storage")
    if ray_storage and not storage.is_uri(ray_storage) and Path(ray_storage) != out and (out / "tune").is_dir():
        if Path(ray_storage).name == out.name:
            rec["ray_storage"] = str(out)
    study = rec.get("study_dir")
    if study and Path(study) != out.parent and Path(study).name == out.parent.name:
        if (out.parent / "study.json").is_file():
            rec["study_dir"] = str(out.parent)
    return rec


def refuse_other_settings(
    out: Path, what: str, given: dict, recorded: dict, said: Callable[[str], str], fix: str
) -> None:
    """FerTuneError naming every option given (not None) that differs from the recorded one (`said(key)`: what
    was recorded, in words); `fix`: how to get a stage with the new settings."""
    conflicts = [
        f"--{k.replace('_', '-')} {v} ({said(k)})" for k, v in given.items() if v is not None and recorded.get(k) != v
    ]
    if conflicts:
        raise FerTuneError(
            f"{out} already holds {what} with other settings: {', '.join(conflicts)}. Run it again without these "
            f"options to continue it, {fix}."
        )


def stage_tuner(rec: StageRecord, trainable: Any, new: Callable[[], Any], trials: int) -> tuple[Any, str]:
    """(the Tuner, its experiment directory) of a stage's Ray experiment in rec["ray_storage"]/tune: Tune's saved
    state continued when it holds a whole one, else `new()` (also when a driver died before Tune saved a state), in
    an empty directory: what a run without a state left there is set aside. Its `trials` are all made at the start
    (a study run before it in this process may have set fewer pending trials)."""
    set_pending_trials(trials, rec["resources"])
    exp = storage.join(rec["ray_storage"], "tune")
    if restorable(exp):
        return restore_tuner(exp, trainable, rec.get("fer_tune")), exp
    moved = set_aside(exp)
    if moved:
        log.warning("%s holds no state to continue from; set aside as %s, the stage starts over", exp, moved)
    return new(), exp


def fit_stage(tuner: Any, rec: StageRecord, path: Path) -> Any:
    """tuner.fit(): its ResultGrid, None when a second Ctrl-C cut it short; the stage's wall time added to its
    record, written to `path` either way."""

    t0 = time.time()
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        grid = None
    rec["wall_seconds"] = rec.get("wall_seconds", 0.0) + time.time() - t0
    write_json(path, rec)
    return grid
