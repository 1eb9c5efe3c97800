"""What the study's later stages (the final stage, the PBT stage) share: the record a stage's directory holds,
and the refusal of options that contradict it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...common import FerTuneError


def read_record(path: Path, what: str) -> dict | None:
    """The stage's record (final.json, pbt.json), None when there is none; a damaged one is refused."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FerTuneError(f"{path} is damaged ({exc}); remove {path.parent} to start {what} again") from None


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


def stage_tuner(rec: dict, trainable: Any, new: Callable[[], Any]) -> tuple[Any, str]:
    """(the Tuner, its experiment directory) of a stage's Ray experiment in rec["ray_storage"]/tune: Tune's saved
    state continued when it holds one, else `new()` (also when a driver died before Tune saved a state)."""
    from . import storage
    from .session import restore_tuner

    exp = storage.join(rec["ray_storage"], "tune")
    if storage.has_tune_state(exp):
        return restore_tuner(exp, trainable, rec.get("fer_tune")), exp
    return new(), exp


def fit_stage(tuner: Any, rec: dict, path: Path) -> Any:
    """tuner.fit(): its ResultGrid, None when a second Ctrl-C cut it short; the stage's wall time added to its
    record, written to `path` either way."""
    import time

    from ...common import write_json

    t0 = time.time()
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        grid = None
    rec["wall_seconds"] = rec.get("wall_seconds", 0.0) + time.time() - t0
    write_json(path, rec)
    return grid
