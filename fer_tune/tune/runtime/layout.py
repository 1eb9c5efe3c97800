"""Tune's on-disk layout of an experiment, read in this one module (as internals.py fences Tune's private
attributes); tests/test_architecture.py checks it against a real Tune run, so a Ray release that moves a file
fails there first:

    EXPERIMENT/tuner.pkl                      the Tuner (searcher, scheduler, callbacks), pickled at the start
    EXPERIMENT/experiment_state-STAMP.json    every trial's status, saved every few seconds by the driver
    EXPERIMENT/search*-STAMP.*, ...           the searcher's state (searcher-state-STAMP.pkl) and the callbacks',
                                              saved with it (STAMP: the driver session that saved them; a
                                              resume starts a new one)
    EXPERIMENT/TRIAL/result.json              one JSON line per tune.report, written by the driver
    EXPERIMENT/TRIAL/params.json              the trial's config
    EXPERIMENT/TRIAL/checkpoint_NNNNNN/       one directory per reported checkpoint

Paths are local paths or pyarrow URIs (fer_tune.tune.runtime.storage).

Tune copies its state into a local storage in place, so a driver killed mid-copy (or a full disk) could leave it
cut off; `whole_state_uploads` has the driver replace each file whole instead, and `settle_state` sets aside a
session whose files are damaged anyway, before a resume reads them."""

from __future__ import annotations

import functools
import json
import logging
import os
import pickletools
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import internals
from .storage import is_uri, join, listdir, read_text, size

log = logging.getLogger(__name__)

TUNER_FILE = "tuner.pkl"
STATE_PREFIX = "experiment_state-"
SEARCHER_PREFIX = "searcher-state-"
DAMAGED = ".damaged"  # the suffix of a state file set aside (Tune reads only names that end in .json or .pkl)
RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"
CHECKPOINT_PREFIX = "checkpoint_"


def result_rows(text: str) -> Iterator[dict]:
    """The results in the JSON lines of a result.json or result-EPOCH.json (a line cut by a kill is skipped)."""
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            yield row


def trial_results(trial_dir: str | Path) -> Iterator[dict]:
    """A trial directory's reported results, in order (none when it has no result.json yet, or is no trial's)."""
    return result_rows(read_text(join(str(trial_dir), RESULT_FILE)) or "")


def _state_names(exp_dir: str | Path) -> list[str]:
    """The experiment_state-*.json files of one Ray experiment, newest session first (by the stamp in the name:
    Tune re-syncs old files at the end, so mtimes lie)."""
    return sorted((n for n in listdir(exp_dir) if n.startswith(STATE_PREFIX) and n.endswith(".json")), reverse=True)


def _parsed(text: str | None) -> dict | None:
    try:
        state = json.loads(text or "")
    except json.JSONDecodeError:
        return None
    return state if isinstance(state, dict) else None


def experiment_trials(exp_dir: str | Path, *, unsaved: bool = False) -> list[dict]:
    """The trials of the newest whole experiment_state-*.json of one Ray experiment, in the order Tune made them:
    {"trial_id", "status", "config", "logdir" (the trial directory's name), "start_time" (None: not started)};
    `unsaved`: also the trials that began after that state was saved (a killed driver), from their directories,
    with status "". Tune names trial directories TRAINABLE_TRIALID_N_PARAMS_TIME, N counting the trials it made."""
    state = None
    for name in _state_names(exp_dir):
        state = _parsed(read_text(join(str(exp_dir), name)))
        if state is not None:
            break
    out = []
    for entry in (state or {}).get("trial_data", []):
        raw, runtime = (entry[0], entry[1]) if isinstance(entry, (list, tuple)) and len(entry) > 1 else (entry, None)
        t, meta = _json_value(raw), _json_value(runtime)
        if isinstance(t, dict) and "trial_id" in t:
            out.append(
                {
                    "trial_id": t["trial_id"],
                    "status": t.get("status", ""),
                    "config": t.get("config") if isinstance(t.get("config"), dict) else {},
                    "logdir": t.get("relative_logdir") or "",
                    "start_time": meta.get("start_time") if isinstance(meta, dict) else None,
                }
            )
    if unsaved:
        known = {t["trial_id"] for t in out}
        for name in listdir(exp_dir):
            rows = list(trial_results(join(str(exp_dir), name)))
            tid = rows[-1].get("trial_id") if rows else None
            config = _json_value(read_text(join(str(exp_dir), name, PARAMS_FILE)))
            if tid and tid not in known and isinstance(config, dict):
                out.append({"trial_id": tid, "status": "", "config": config, "logdir": name, "start_time": None})
                known.add(tid)

    def made(t: dict) -> int:
        tag = t["logdir"].partition(f"_{t['trial_id']}_")[2].partition("_")[0]
        return int(tag) if tag.isdigit() else len(out)

    return sorted(out, key=made)


def searcher_states(exp_dir: str | Path) -> list[str]:
    """The searcher's saved states (searcher-state-STAMP.pkl) of a Ray experiment (a path or URI), one per driver
    session, oldest first."""
    names = [n for n in listdir(exp_dir) if n.startswith(SEARCHER_PREFIX) and n.endswith(".pkl")]
    return [join(str(exp_dir), n) for n in names]


def _json_value(raw: Any) -> Any:
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return None


def experiment_trial_states(exp_dir: str | Path) -> dict[str, str]:
    """{ray trial id: Tune status} from the newest whole experiment_state-*.json of one Ray experiment."""
    return {t["trial_id"]: t["status"] for t in experiment_trials(exp_dir)}


def state_saved_at(exp_dir: str | Path) -> float | None:
    """When Tune last saved the experiment state of a local experiment directory (None: not yet)."""
    times = [p.stat().st_mtime for p in Path(exp_dir).glob(STATE_PREFIX + "*.json")]
    return max(times, default=None)


def has_tune_state(exp_dir: str | Path) -> bool:
    """True when a Ray experiment (local path or URI) holds a state Tuner.restore can continue: its tuner.pkl
    written whole and an experiment state saved. A driver killed in its first seconds leaves neither (or an empty
    tuner.pkl): such a run starts over."""
    if TUNER_FILE not in listdir(exp_dir) or not _state_names(exp_dir):
        return False
    if is_uri(exp_dir):
        return size(join(str(exp_dir), TUNER_FILE)) > 0
    return _whole(Path(exp_dir) / TUNER_FILE)


# ---------------------------------------------------------------------------------------------------------
# the driver's saved state, written whole and read only when whole
# ---------------------------------------------------------------------------------------------------------
def _whole(path: Path) -> bool:
    """A saved state file read whole: experiment_state as JSON, the searcher's and callbacks' pickles (some named
    .json) to their STOP opcode (walked, never loaded)."""
    if path.name.startswith(STATE_PREFIX):
        return _whole_json(path)
    try:
        data = path.read_bytes()
    except OSError:
        return False
    try:
        return bool(data) and [op.name for op, _, _ in pickletools.genops(data)][-1] == "STOP"
    except Exception:  # a cut-off or garbled pickle: pickletools raises ValueError and friends
        return False


def _whole_json(path: Path) -> bool:
    try:
        return _parsed(path.read_bytes().decode(errors="replace")) is not None
    except OSError:
        return False


def settle_state(exp_dir: str | Path) -> list[str]:
    """Before a resume reads a local experiment: each saved session, newest first, with a file that is not whole
    (a kill or a full disk mid-write) has its files renamed NAME.damaged, so that Tune restores the newest whole
    session, or none (then the run starts over). The names set aside; a URI's objects are written whole already."""
    if is_uri(exp_dir) or not Path(exp_dir).is_dir():
        return []
    exp = Path(exp_dir)
    aside: list[str] = []
    for name in _state_names(exp):
        stamp = name[len(STATE_PREFIX) : -len(".json")]
        files = sorted(
            p
            for p in exp.iterdir()
            if p.is_file() and f"-{stamp}." in p.name and not p.name.endswith(DAMAGED) and not p.name.startswith(".")
        )
        if all(_whole(p) for p in files):
            break
        for p in files:
            p.rename(p.with_name(p.name + DAMAGED))
            aside.append(p.name)
    return aside


def rerooted_resumes() -> None:
    """In the driver: a resumed Tune run makes the trials it had not begun where the run is now, not in the place
    its saved searcher names (Tune re-roots the trials it restores, not the experiment its restored search
    algorithm makes new ones from: a moved or copied study would have written them to the old place, or failed
    there). Idempotent."""
    controller = internals.tune_controller()
    resume = controller.resume
    if getattr(resume, "rerooted", False):
        return

    @functools.wraps(resume)
    def resumed(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = resume(self, *args, **kwargs)
        internals.reroot_search(self)
        return out

    resumed.rerooted = True  # type: ignore[attr-defined]
    controller.resume = resumed


def restorable(exp_dir: str | Path) -> bool:
    """has_tune_state, once the damaged sessions are set aside (settle_state), with a warning naming them."""
    aside = settle_state(exp_dir)
    ok = has_tune_state(exp_dir)
    if aside:
        log.warning(
            "%s: Tune's saved state was cut off mid-write (a kill or a full disk); set aside %s as %s, %s",
            exp_dir,
            ", ".join(aside),
            f"*{DAMAGED}",
            "continuing from the state saved before it" if ok else "no whole state is left: the run starts over",
        )
    return ok


def set_aside(exp_dir: str | Path) -> str | None:
    """A local experiment that no resume can continue (no whole state left) renamed EXP.unreadable-TIME, so that
    a new run of the stage starts in an empty directory; the new name (None: nothing there, or a URI)."""
    exp = Path(str(exp_dir))
    if is_uri(exp_dir) or not exp.is_dir():
        return None
    target = exp.with_name(f"{exp.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
    exp.rename(target)
    return str(target)


# Tune copies the whole of the driver's staging directory at every sync, and it holds every trial's logger files
# (params.json, result.json, progress.csv, ...): thousands of files that stop changing when their trial ends. A file
# copied once it had been still for UNCHANGED_S seconds is not copied again while its size and mtime stay the same.
# To another storage (S3, GCS) the changed files go one by one, or all through Tune's copy when there are more than
# BULK_FILES of them (a new driver's first copy).
UNCHANGED_S = 2.0
BULK_FILES = 100
_COPIED: dict[tuple[str, str], tuple[int, int]] = {}  # (storage, target) -> (size, mtime_ns) of the source copied


def whole_state_uploads() -> None:
    """In the driver: each file of the state Tune copies from Ray's staging directory to a local storage is
    written beside its target and renamed over it, so a kill or a full disk mid-copy leaves the last whole state in
    place (Tune's own copy writes in place); to another storage, Tune's experiment state is read whole before it is
    uploaded; to any storage, a file that has not changed since its last copy is not copied again (Tune's copies
    every file at every sync). Idempotent."""
    module, name = internals.storage_upload()
    upload = getattr(module, name)
    if getattr(upload, "whole_files", False):
        return

    @functools.wraps(upload)  # Ray's name: Tune's pickles that hold it name Ray's function, as before
    def whole(local_path: str, fs: Any, fs_path: str, exclude: list | None = None) -> None:
        import pyarrow.fs as pafs

        if not os.path.isdir(local_path) or exclude:
            upload(local_path=local_path, fs=fs, fs_path=fs_path, exclude=exclude)
            return
        local = isinstance(fs, pafs.LocalFileSystem)
        changed = []  # (source, target, its stat) of the files not copied as they are now
        for root, _, files in os.walk(local_path):  # targets as storage paths: '/'-separated
            target = posixpath.normpath(posixpath.join(fs_path, Path(os.path.relpath(root, local_path)).as_posix()))
            if local:
                os.makedirs(target, exist_ok=True)
            for f in files:
                dst = posixpath.join(target, f)
                st = _changed(os.path.join(root, f), (fs.type_name, dst), local)
                if st is not None:
                    changed.append((os.path.join(root, f), dst, st))
        began = time.time()
        if local:
            for src, dst, st in changed:
                # Tune rewrites the staged experiment state in place, maybe while this copy reads it: a torn read
                # is not put in place (the next copy brings the newer state)
                check = _whole_json if os.path.basename(src).startswith(STATE_PREFIX) else None
                _copied((fs.type_name, dst), st, began, replace_whole(src, dst, check))
            return
        bulk = len(changed) > BULK_FILES
        if bulk:
            upload(local_path=local_path, fs=fs, fs_path=fs_path)
        for src, dst, st in changed:
            done = True
            if os.path.basename(src).startswith(STATE_PREFIX):  # after a bulk copy too: it may have read it torn
                done = _upload_whole(upload, src, fs, dst)
            elif not bulk:
                upload(local_path=src, fs=fs, fs_path=dst)
            _copied((fs.type_name, dst), st, began, done)

    whole.whole_files = True  # type: ignore[attr-defined]
    setattr(module, name, whole)


def _upload_whole(upload: Any, src: str, fs: Any, dst: str) -> bool:
    """Upload what Tune's experiment state `src` holds now, read whole: copied aside, checked, then uploaded (Tune
    rewrites it in place, maybe while it is read); False where the copy was torn (the next sync brings it)."""
    fd, part = tempfile.mkstemp(prefix=".fer-tune-", suffix=".json")
    os.close(fd)
    try:
        shutil.copyfile(src, part)
        if not _whole_json(Path(part)):
            return False
        upload(local_path=part, fs=fs, fs_path=dst)
        return True
    finally:
        os.unlink(part)


def _changed(src: str, key: tuple[str, str], local: bool) -> os.stat_result | None:
    """src's stat, None where it is gone (Tune deletes old states) or its last copy `key` holds it as it is now."""
    try:
        st = os.stat(src)
    except FileNotFoundError:
        return None
    if _COPIED.get(key) == (st.st_size, st.st_mtime_ns) and (not local or os.path.exists(key[1])):
        return None
    return st


def _copied(key: tuple[str, str], st: os.stat_result, began: float, done: bool) -> None:
    """Remember a copy that holds what the file holds now: one put in place of a file still for UNCHANGED_S before
    it began."""
    if done and st.st_mtime_ns / 1e9 < began - UNCHANGED_S:
        _COPIED[key] = (st.st_size, st.st_mtime_ns)
    else:
        _COPIED.pop(key, None)


def replace_whole(src: str, dst: str, check: Any = None) -> bool:
    """Copy src over dst through a temporary file beside it: dst is the old file or the new one, never a part;
    `check(path)` False: the copy is dropped and dst kept. True when the copy was put in place."""
    part = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{os.getpid()}.part")
    try:
        shutil.copyfile(src, part)
        if check is not None and not check(Path(part)):
            os.unlink(part)
            return False
        os.replace(part, dst)
        return True
    except BaseException:
        try:
            os.unlink(part)
        except OSError:
            pass
        raise
