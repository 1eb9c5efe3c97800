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
    """What is wrong with an Optuna sqlite database, read only (None: it is whole and holds Optuna's tables)."""
    import sqlite3

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
