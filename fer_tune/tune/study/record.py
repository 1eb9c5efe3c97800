"""A study's record: study.json, the fingerprint that guards a resume, the storages it names.

results/NAME/study.json holds what was launched: the spec, the data source, the Optuna storage (a reference:
`sqlite:///optuna.db` for the study's own database, relative to the study directory so that the directory can be
moved or copied, another `sqlite:///...`, a URL without a password, or `env:VAR`), Ray's storage, the MLflow tracking URI (`mlflow`: a
reference too, see mlflow_ref), one entry per run (the sweep, each extend) and a fingerprint of the inputs (space,
data, versions). A resume or extend refuses when the fingerprint changed, unless --force.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import unquote, urlsplit

from ...common import NAME_RULE, FerTuneError, code_revision, is_plain_name, write_json
from ..runtime.session import versions
from .database import OWN_DB, check_database
from .spaces import find_space, parse_space
from .spec import StudySpec

STUDY_FILE = "study.json"
_OWN_REF = f"sqlite:///{OWN_DB}"
_HERE: list[Path] = []  # the study directory this process works on now (set by read_study and new_record)


class SessionRecord(TypedDict, total=False):
    """One command's share of a run (new_session); the driver adds how it ended (a killed one leaves no end)."""

    kind: str  # start | resume
    started: str
    trials_continued: int
    code: str
    ended: str
    wall_seconds: float
    outcome: str  # finished | interrupted
    trials_finished: int
    slurm: dict  # the SLURM job (job_id, nodes, restarts), when the command ran in one


class RunRecord(TypedDict, total=False):
    """One Ray experiment of a study: the sweep ("tune") or an extend ("extend-K") (new_run)."""

    dir: str
    num_samples: int
    seed: int
    max_concurrent: int | None
    code: str
    wall_seconds: float
    sessions: list[SessionRecord]


REQUIRED_KEYS = ("name", "spec", "runs")  # what every command reads first


class StudyRecord(TypedDict, total=False):
    """study.json (new_record): what was launched, and every run and session since."""

    name: str
    space_file: str
    spec: dict
    overrides: dict
    data: dict
    storage: str  # the Optuna storage: a reference (sqlite path, URL, env:VAR)
    ray_storage: str | None  # None: the study directory
    optuna_study: str
    fingerprint: dict
    created: str
    runs: list[RunRecord]
    mlflow: str | None


def optuna_lib() -> Any:
    """optuna, with its INFO log off (a line per trial; fer-tune reports trials itself): the one place it is set."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def located(ref: str) -> str:
    """The Optuna storage reference `ref` for the study directory this process works on: its own database recorded
    relative to it, or where the study was made (an absolute path in study.json of earlier releases, and in Tune's
    pickled searcher), is the optuna.db in the directory where the study is now (moved, or copied: a copy then
    writes its own database, never the original's)."""
    if not _HERE or not ref.startswith("sqlite:///"):
        return ref
    here = _HERE[-1]
    path = Path(ref[len("sqlite:///") :])
    if ref == _OWN_REF or (path.name == OWN_DB and path.parent.name == here.name and path.parent != here):
        return f"sqlite:///{here / OWN_DB}"
    return ref


def _working_on(sdir: Path) -> None:
    _HERE[:] = [Path(sdir).resolve()]


def working_on() -> Path | None:
    """The study directory this process works on (None: none yet)."""
    return _HERE[-1] if _HERE else None


def resolve_storage(ref: str) -> Any:
    """'sqlite:///...', 'env:VAR' (the URL read from the environment, e.g. with a password) or any SQLAlchemy URL;
    the study's own database where the study is now (located). A database server's storage rides out a dropped
    connection or a restart (fer_tune.tune.study.dbretry)."""
    optuna = optuna_lib()
    ref = located(ref)
    url = from_env(ref, "storage") if ref.startswith("env:") else ref
    if url.startswith("sqlite"):
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    from .dbretry import CONNECT_SECONDS, connection_lost, retrying_storage

    shown = ref if ref.startswith("env:") else url.split("://")[0] + "://..."
    try:
        return retrying_storage(lambda: optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}))
    except ImportError:  # the database's driver (Optuna's message names none)
        raise FerTuneError(
            f"storage {shown}: the database driver of this URL is not installed (PostgreSQL: pip install -e "
            "'.[postgres]', URLs postgresql+psycopg://...)"
        ) from None
    except Exception as exc:
        if not connection_lost(exc):
            raise
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise FerTuneError(
            f"storage {shown}: the database cannot be reached for {CONNECT_SECONDS:.0f} s ({first}); check the "
            "URL's host, port and credentials"
        ) from None


def load_optuna_study(record: StudyRecord) -> Any:
    """The study's optuna.Study."""
    return optuna_lib().load_study(study_name=record["optuna_study"], storage=resolve_storage(record["storage"]))


def epoch_values(trial: Any) -> dict[int, float]:
    """{epoch: the first objective's value} an Optuna trial (frozen) holds: its intermediate values, or in a
    multi-objective study (where Optuna has none: its samplers read them as one objective's) its `objectives`
    attribute {epoch: [every objective's value]}."""
    if trial.intermediate_values:
        return dict(trial.intermediate_values)
    return {int(e): v[0] for e, v in trial.user_attrs.get("objectives", {}).items()}


def storage_ref(arg: str | None, sdir: Path) -> str:
    """The Optuna storage reference of a new study (`storage`): --optuna-storage, else the study's own sqlite
    database (in memory where it is; study.json records it relative to the study directory)."""
    if not arg:
        return f"sqlite:///{sdir / OWN_DB}"
    if arg.startswith("env:"):
        return arg
    if "://" not in arg:
        raise FerTuneError(
            f"--optuna-storage {arg}: give a SQLAlchemy URL (sqlite:////ABS/PATH/optuna.db, "
            "postgresql://USER@HOST/DB) or env:VAR naming an environment variable that holds one; "
            "--storage is where Ray keeps checkpoints and results"
        )
    if urlsplit(arg).password:
        raise FerTuneError(
            "--optuna-storage: the URL holds a password, which would be written to the study files; "
            "put the URL in an environment variable and pass --optuna-storage env:VARNAME"
        )
    return arg


def from_env(ref: str, what: str) -> str:
    """The value of the environment variable an `env:VAR` reference names (`what`: the option, for the error)."""
    value = os.environ.get(ref[4:], "")
    if not value:
        raise FerTuneError(f"{what} {ref}: the environment variable {ref[4:]} is not set on this machine")
    return value


MLFLOW_OFF = "off"
MLFLOW_FORMS = (
    "a directory or file:///PATH (an MLflow file store), http(s)://HOST:PORT (a tracking server), env:VAR naming "
    "an environment variable that holds one, or off"
)


def mlflow_ref(arg: str) -> str | None:
    """What study.json and final.json record for --mlflow ARG: None for `off`, env:VAR as given, an http(s) URL as
    given (refused with a password in it), a path or file: URI as file:///ABSOLUTE/PATH."""
    if arg == MLFLOW_OFF:
        return None
    if arg.startswith("env:"):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", arg[4:]):
            raise FerTuneError(f"--mlflow {arg}: env:VAR names an environment variable (letters, digits and _)")
        return arg
    return _tracking_uri(arg, f"--mlflow {arg}", secret=False)


def mlflow_uri(ref: str) -> str:
    """The tracking URI of a recorded reference (env:VAR read from the environment, never shown)."""
    if not ref.startswith("env:"):
        return ref
    return _tracking_uri(from_env(ref, "--mlflow"), f"--mlflow {ref} (the URI in {ref[4:]})", secret=True)


def _tracking_uri(value: str, what: str, *, secret: bool) -> str:
    """The tracking URI `value` names (a path: file:///ABSOLUTE/PATH); `secret`: it came from the environment, so
    it may hold a password and is never shown."""
    parts = urlsplit(value)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise FerTuneError(f"{what}: the URL names no host; give {MLFLOW_FORMS}")
        if parts.password and not secret:
            raise FerTuneError(
                "--mlflow: the URL holds a password, which would be written to the study files; put the URL in an "
                "environment variable and pass --mlflow env:VARNAME"
            )
        return value.rstrip("/")
    if parts.scheme == "file" and parts.netloc in ("", "localhost") and parts.path:
        path = unquote(parts.path)
    elif not parts.scheme and value.strip():
        path = value
    else:
        raise FerTuneError(f"{what}: give {MLFLOW_FORMS}")
    return Path(path).expanduser().resolve().as_uri()


def study_dir(results: str, name: str | None, default: str, space_path: str) -> Path:
    """RESULTS/NAME for a new study, refused unless NAME is a plain name and the directory is inside RESULTS."""
    given = "--name" if name else f"the study name of {space_path}"
    name = name or default
    if not is_plain_name(name):
        raise FerTuneError(
            f"{given} {name!r}: {NAME_RULE} (it becomes RESULTS/NAME, Ray's storage prefix and the "
            "Optuna study's name)" + ("" if given == "--name" else "; pass --name NAME")
        )
    root = Path(results).expanduser().resolve()
    sdir = (root / name).resolve()
    if sdir.parent != root:
        raise FerTuneError(
            f"{root / name} leads to {sdir}, outside the results root {root} (a symbolic link?); "
            "choose another --name or --results"
        )
    return sdir


def read_study(sdir: str | Path, *, check: bool = True) -> StudyRecord:
    """study.json of a study directory (FerTuneError when it is not one); `check`: its own Optuna database is
    checked too (check_database)."""
    sdir = Path(sdir)
    f = sdir / STUDY_FILE
    if not f.is_file():
        from ..slurm.script import SCRIPT

        if (sdir / SCRIPT).is_file():  # `fer-tune slurm SPACE` wrote the job; its first allocation makes the study
            raise FerTuneError(
                f"{sdir} holds a SLURM job's script ({SCRIPT}) but no study yet: the job has not started it (submit "
                f"it with sbatch {sdir / SCRIPT}; squeue --me shows whether it waits in the queue)"
            )
        hint = " (it does not exist)" if not sdir.exists() else f" ({sdir} has no {STUDY_FILE})"
        raise FerTuneError(f"{sdir} is not a fer-tune study directory{hint}; start one with fer-tune sweep")
    try:
        record = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FerTuneError(f"{f} is damaged ({exc}); fer-tune cannot read the study from it") from None
    if not isinstance(record, dict):
        raise FerTuneError(f"{f} is damaged (not a JSON object); fer-tune cannot read the study from it")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing or not isinstance(record["runs"], list) or not isinstance(record["spec"], dict):
        what = f"it has no {', '.join(missing)}" if missing else "its runs or spec are not what fer-tune writes"
        raise FerTuneError(f"{f} is damaged ({what}); fer-tune cannot read the study from it")
    _working_on(sdir)
    if isinstance(record.get("storage"), str):
        record["storage"] = located(record["storage"])
    if check:
        check_database(sdir, record)
    return record


def write_study(sdir: Path, record: StudyRecord) -> None:
    """study.json, its own database's path relative to it."""
    own = record.get("storage") == f"sqlite:///{Path(sdir).resolve() / OWN_DB}"
    write_json(sdir / STUDY_FILE, {**record, "storage": _OWN_REF} if own else record)


def new_record(
    sdir: Path,
    spec: StudySpec,
    space_path: str,
    overrides: dict,
    source: str,
    protocol: str,
    data: Any,
    optuna_ref: str,
    ray_storage: str | None,
    max_concurrent: int | None,
    space_label: str | None = None,
) -> StudyRecord:
    """The study.json of a new study (its first run: the sweep, in tune/); `space_label` names a space that is no
    file of its own (the demo's) in place of the space file's path."""
    _working_on(sdir)
    return {
        "name": sdir.name,
        "space_file": space_label or str(find_space(space_path).resolve()),
        "spec": spec.to_dict(),
        "overrides": overrides,
        "data": {"source": source, "protocol": protocol, **data.describe()},
        "storage": optuna_ref,
        "ray_storage": ray_storage,
        "optuna_study": sdir.name,
        "fingerprint": fingerprint(spec, data),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": [new_run("tune", spec.num_samples, spec.seed, max_concurrent)],
    }


def new_run(directory: str, num_samples: int, seed: int, max_concurrent: int | None) -> RunRecord:
    """One run of a study (the sweep or an extend): its Ray experiment and the code revision that started it."""
    return {
        "dir": directory,
        "num_samples": num_samples,
        "seed": seed,
        "max_concurrent": max_concurrent,
        "code": code_revision(),
    }


def new_session(continued: int | None) -> SessionRecord:
    """One command's share of a run (runs[i].sessions): when, by which code; for a resume (`continued` not None)
    the trials it took up unfinished (each continues from its last checkpoint, or starts over without one). The
    run's driver adds how it ended (ended, wall_seconds, outcome, trials_finished); a killed one leaves no end."""
    session: SessionRecord = {
        "kind": "start" if continued is None else "resume",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if continued is not None:
        session["trials_continued"] = continued
    session["code"] = code_revision()
    job = slurm_job()
    if job:
        session["slurm"] = job
    return session


def slurm_job() -> dict | None:
    """The SLURM job this command runs in (job id, its nodes, how often it was requeued), from the environment
    SLURM gives a batch job; None outside one."""
    env = os.environ
    if not env.get("SLURM_JOB_ID"):
        return None
    return {
        "job_id": env["SLURM_JOB_ID"],
        "nodes": env.get("SLURM_JOB_NODELIST", ""),
        "restarts": int(env.get("SLURM_RESTART_COUNT") or 0),
        **({"partition": env["SLURM_JOB_PARTITION"]} if env.get("SLURM_JOB_PARTITION") else {}),
    }


def fingerprint(spec: StudySpec, data: Any) -> dict:
    return {
        "space_sha256": spec.sha256,
        "data_source": data.source,
        "data_fingerprint": data.fingerprint,
        "protocol": data.protocol,
        "versions": versions(),
    }


def diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs between two nested dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def spec_with(text: str, overrides: dict, source: str, name: str) -> StudySpec:
    """The spec of a space file's text with the command-line overrides a study was launched with."""
    import yaml

    return parse_space({**yaml.safe_load(text), **overrides}, source=source, text=text, default_name=name)


def study_spec(sdir: Path, record: dict) -> StudySpec:
    """The spec of the study in `sdir`: its copy of the space file with the overrides it was launched with."""
    copy = Path(sdir) / "space.yaml"
    if not copy.is_file():
        raise FerTuneError(f"{copy} is missing: the study's copy of its search space, which resume and extend run")
    return spec_with(copy.read_text(), record["overrides"], str(copy), record["name"])


def reopen(sdir: Path, force: bool, loader: Callable[[str, str], Any]) -> tuple[dict, StudySpec, Any]:
    """(record, spec, data) of an existing study, refused when its inputs changed since it started (unless force)."""
    record = read_study(sdir)
    spec = study_spec(sdir, record)
    data = loader(record["data"]["source"], record["data"]["protocol"])
    changes = diff(record["fingerprint"], fingerprint(spec, data))
    space_file = Path(record["space_file"])
    if space_file.is_file() and space_file.read_text() != spec.text:
        changes.append(f"space file {space_file} was edited since the study started (the study keeps its copy)")
    if changes and not force:
        raise FerTuneError(
            f"{sdir}: the study's inputs changed since it started: "
            + "; ".join(changes)
            + ". Pass --force to continue anyway."
        )
    return record, spec, data
