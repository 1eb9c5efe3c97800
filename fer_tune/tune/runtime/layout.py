"""Tune's on-disk layout of an experiment, read in this one module (as internals.py fences Tune's private
attributes); tests/test_architecture.py checks it against a real Tune run, so a Ray release that moves a file
fails there first:

    EXPERIMENT/tuner.pkl                      the Tuner (searcher, scheduler, callbacks), pickled at the start
    EXPERIMENT/experiment_state-STAMP.json    every trial's status, saved every few seconds by the driver
    EXPERIMENT/TRIAL/result.json              one JSON line per tune.report, written by the driver
    EXPERIMENT/TRIAL/checkpoint_NNNNNN/       one directory per reported checkpoint

Paths are local paths or pyarrow URIs (fer_tune.tune.runtime.storage)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .storage import join, listdir, read_text, size

TUNER_FILE = "tuner.pkl"
STATE_PREFIX = "experiment_state-"
RESULT_FILE = "result.json"
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


def experiment_trial_states(exp_dir: str | Path) -> dict[str, str]:
    """{ray trial id: Tune status} from the newest experiment_state-*.json of one Ray experiment."""
    # newest session by the timestamp in the name (Tune re-syncs old files at the end, so mtimes lie)
    files = [n for n in listdir(exp_dir) if n.startswith(STATE_PREFIX) and n.endswith(".json")]
    if not files:
        return {}
    try:
        state = json.loads(read_text(join(str(exp_dir), max(files))) or "")
    except json.JSONDecodeError:
        return {}
    out = {}
    for entry in state.get("trial_data", []):
        raw = entry[0] if isinstance(entry, (list, tuple)) else entry
        try:
            t = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError:
            continue
        if isinstance(t, dict) and "trial_id" in t:
            out[t["trial_id"]] = t.get("status", "")
    return out


def state_saved_at(exp_dir: str | Path) -> float | None:
    """When Tune last saved the experiment state of a local experiment directory (None: not yet)."""
    times = [p.stat().st_mtime for p in Path(exp_dir).glob(STATE_PREFIX + "*.json")]
    return max(times, default=None)


def has_tune_state(exp_dir: str | Path) -> bool:
    """True when a Ray experiment (local path or URI) holds a state Tuner.restore can continue: its tuner.pkl
    written whole and an experiment state saved. A driver killed in its first seconds leaves neither (or an empty
    tuner.pkl): such a run starts over."""
    names = listdir(exp_dir)
    if TUNER_FILE not in names or not any(n.startswith(STATE_PREFIX) for n in names):
        return False
    return size(join(str(exp_dir), TUNER_FILE)) > 0
