"""The study's own Optuna database (optuna.db in its directory), checked before a command reads it: a damaged one
(a full disk or a kill mid-write, sqlite on a network filesystem) or a lost one (a copy that left it out) is one
clear error naming `fer-tune repair` (fer_tune.tune.study.repair), instead of a traceback from deep in SQLAlchemy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...common import FerTuneError

OWN_DB = "optuna.db"  # the study's own Optuna database, in its directory (recorded as sqlite:///optuna.db)


def own_database(sdir: str | Path, record: Any) -> Path | None:
    """The study's own Optuna database (optuna.db in its directory), None when it keeps its trials elsewhere."""
    db = Path(sdir).resolve() / OWN_DB
    return db if record.get("storage") == f"sqlite:///{db}" else None


def check_database(sdir: str | Path, record: Any) -> None:
    """One clear error when the study's own optuna.db is damaged (a full disk or a kill mid-write, a network
    filesystem) or lost while trials ran, naming the command that rebuilds it (fer-tune repair)."""
    db = own_database(sdir, record)
    if db is None:
        return
    fix = f"rebuild it from the trials' own results with: fer-tune repair {sdir}"
    if not db.exists():
        from ..runtime.layout import experiment_trials
        from ..runtime.storage import experiment_dirs

        ran = sum(len(experiment_trials(exp, unsaved=True)) for exp in experiment_dirs(sdir, record))
        if ran:
            raise FerTuneError(f"{db}, the study's Optuna database, is missing while {ran} trial(s) ran; {fix}")
        return
    problem = database_damage(db)
    if problem:
        raise FerTuneError(f"{db}, the study's Optuna database, is damaged ({problem}); {fix}")


def database_damage(db: Path) -> str | None:
    """What is wrong with an Optuna sqlite database (None: it is whole and holds Optuna's tables), read only. A
    journal beside it (a writer killed mid-transaction: SIGKILL, a SLURM requeue, a preemption) is rolled back
    first, as SQLite's next writer would: read only, SQLite refuses to read past it ("attempt to write a readonly
    database") although nothing is damaged."""
    import contextlib
    import sqlite3

    hot = db.with_name(db.name + "-journal")
    try:
        if hot.exists() and hot.stat().st_size:
            with contextlib.closing(sqlite3.connect(db, timeout=60)) as rw:
                rw.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        pass  # a database it cannot write: read only below says what is wrong
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=60)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        rows = con.execute("PRAGMA quick_check").fetchall()
        con.execute("SELECT count(*) FROM trials").fetchone()
    except sqlite3.DatabaseError as exc:
        return None if "locked" in str(exc) else str(exc)
    finally:
        con.close()
    if rows == [("ok",)]:
        return None
    found = [line for r in rows for line in str(r[0]).splitlines() if line and not line.startswith("***")]
    return "; ".join(found[:2]) + (f"; and {len(found) - 2} more" if len(found) > 2 else "")
