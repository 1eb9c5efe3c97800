"""Trial checkpoints in a crash: which ones are kept, and where a restored trial continues from.

Tune's own `CheckpointConfig(num_to_keep=K)` deletes a trial's older checkpoints as new ones arrive, but the
experiment state it saves (every few seconds, asynchronously on S3) may still name one of them. With a score
order it deletes the trial's latest checkpoint as soon as a better one comes, before any saved state knows the
new one. A driver killed in that window leaves a state whose trials restore from checkpoints that are gone: on
resume Tune fails them ("Could not recover from checkpoint as it does not exist on storage anymore", three times,
then the trial is lost), and logs "Error handling checkpoint ... FileNotFoundError" when it deletes one a second
time. So fer-tune runs Tune with num_to_keep=None (Tune deletes nothing) and:

- `pruner()`, a Tune callback in the driver, empties a trial's checkpoints once they are older than its newest
  `latest` ones and a newer one has existed for a minute (the saved state names that one by then), except the
  pinned ones (the best by the study's metric; the final stage's evaluation snapshots and finished runs). An
  emptied checkpoint keeps its directory and its result-EPOCH.json, nothing else;
- `restore()`, in the trial, loads the checkpoint Tune hands it, or where that one is emptied or damaged (a
  kill in the middle of writing it), the newest intact one beside it, so a trial is never lost: at worst it
  redoes a few epochs.

Every checkpoint holds result-EPOCH.json (the epoch's result) so that a driver started again can tell its trials' older
checkpoints apart, and so that trials.csv has the epochs whose result.json lines a killed driver lost.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .layout import CHECKPOINT_PREFIX, result_rows
from .storage import join, list_files, read_text

log = logging.getLogger(__name__)
META_RE = re.compile(r"result-(\d+)\.json")  # in a checkpoint: result-EPOCH.json, the epoch's result


def scalars(metrics: dict) -> dict:
    """The metrics Tune records (numbers, strings and flags; no lists or dicts)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}


def write_meta(directory: Path, metrics: dict) -> None:
    """result-EPOCH.json in a checkpoint being written: the report it goes with. The trial writes its checkpoint to
    the Ray storage before the report reaches the driver, so this copy of the epoch's result survives a driver
    killed before Tune's own result.json (written by the driver, copied to the storage every few seconds) got it;
    the epoch in the name lets a reader find it in one listing of the trial's directory."""
    (directory / f"result-{int(metrics.get('epoch', 0))}.json").write_text(json.dumps(scalars(metrics)))


def checkpointed_results(trial_dir: str, missing: Callable[[int], bool] | None = None) -> list[dict]:
    """The results a trial's checkpoints hold (result-EPOCH.json, see write_meta) in a trial directory (a path or
    URI): one listing of the directory, and a read only for the epochs `missing(epoch)` asks for (default all)."""
    rows = []
    for path in list_files(trial_dir):
        parts = path.split("/")
        m = META_RE.fullmatch(parts[-1])
        if len(parts) == 2 and m and (missing is None or missing(int(m.group(1)))):
            rows += [r for r in result_rows(read_text(join(trial_dir, *parts)) or "") if "epoch" in r]
    return rows


def checkpoint_dirs(fs, directory: str) -> list[str]:
    """The checkpoint directories in a trial's directory, newest first."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(directory.rstrip("/"), allow_not_found=True))
    except OSError:
        return []
    return sorted(
        (i.path for i in infos if i.base_name.startswith(CHECKPOINT_PREFIX) and i.type == pafs.FileType.Directory),
        reverse=True,
    )


def siblings(fs, path: str) -> list[str]:
    """The checkpoint directories beside the checkpoint at `path` (itself too), newest first."""
    return checkpoint_dirs(fs, path.rstrip("/").rsplit("/", 1)[0])


def read_meta(fs, path: str) -> dict:
    """The result a checkpoint directory holds ({} when it has none or it cannot be read)."""
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), allow_not_found=True))
        name = next((i.path for i in infos if META_RE.fullmatch(i.base_name)), None)
        if name is None:
            return {}
        with fs.open_input_stream(name) as fh:
            meta = json.loads(fh.read().decode())
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def restore(checkpoint: Any, load: Callable[[Path], Any], order: Callable[[dict], float] | None = None) -> Any:
    """load(dir) of `checkpoint` (a ray.tune.Checkpoint); where it is gone or load fails (damaged), of the newest
    intact checkpoint beside it (newest by order(meta), default the epoch in meta.json); None when there is none:
    the trial starts over."""
    from ray import tune

    fs = checkpoint.filesystem
    order = order or (lambda meta: float(meta.get("epoch", -1)))

    def fallbacks():  # listed and ranked only when the handed checkpoint cannot be restored
        others = [p for p in siblings(fs, checkpoint.path) if p != checkpoint.path]
        rank = {p: (order(read_meta(fs, p)), p) for p in others}
        yield from sorted(others, key=lambda p: rank[p], reverse=True)

    for path in itertools.chain([checkpoint.path], fallbacks()):
        try:
            with tune.Checkpoint(path=path, filesystem=fs).as_directory() as d:
                out = load(Path(d))
        except Exception as exc:  # gone, cut short by a kill, unreadable: the next older one
            log.warning("fer-tune: checkpoint %s cannot be restored (%s: %s)", path, type(exc).__name__, exc)
            continue
        if path != checkpoint.path:
            log.warning("fer-tune: continuing from %s instead of %s", path, checkpoint.path)
        return out
    log.warning("fer-tune: no intact checkpoint beside %s: the trial starts over", checkpoint.path)
    return None


GRACE_S = 60.0  # a checkpoint is deleted only this long after a newer one came: by then a saved state names that


def empty(fs, path: str) -> int:
    """Delete a checkpoint's contents but its result-EPOCH.json: the directory stays (so Tune, restoring a trial
    from it, finds it and the trial falls back to its newest intact checkpoint) and so does the epoch's result
    (a few hundred bytes). How many entries went (0: it was emptied already)."""
    import pyarrow.fs as pafs

    n = 0
    for info in fs.get_file_info(pafs.FileSelector(path.rstrip("/"))):
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
            n += 1
        elif not META_RE.fullmatch(info.base_name):
            fs.delete_file(info.path)
            n += 1
    return n


def pruner(
    *,
    latest: int = 3,
    score: str | None = None,
    mode: str = "max",
    pinned: Callable[[dict], bool] | None = None,
    grace_s: float = GRACE_S,
) -> Any:
    """A Tune callback that keeps each trial's newest `latest` checkpoints, its best by `score` (if given) and
    those `pinned(metrics)` chooses, and deletes the others once a newer checkpoint has existed for `grace_s`
    (Tune's saved experiment state, a few seconds behind, names the newer one by then; see the module
    docstring)."""
    import time

    from ray.tune import Callback

    sign = 1.0 if mode == "max" else -1.0

    class Pruner(Callback):
        def __init__(self):
            self._kept: dict[str, list[dict]] = {}  # trial id -> [{path, score, pinned}], oldest first

        def _entry(self, path: str, metrics: dict) -> dict:
            value = metrics.get(score) if score else None
            return {
                "path": path,
                "score": sign * float(value) if isinstance(value, (int, float)) else None,
                "pinned": bool(pinned and pinned(metrics)),
                "t": time.monotonic(),
            }

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            fs, path = checkpoint.filesystem, checkpoint.path
            kept = self._kept.get(trial.trial_id)
            if kept is None:  # first sight in this driver: the trial's checkpoints from before a restart
                kept = [self._entry(p, read_meta(fs, p)) for p in sorted(siblings(fs, path)) if p != path]
                self._kept[trial.trial_id] = kept
            kept[:] = [e for e in kept if e["path"] != path]  # a restored trial writes its index again
            kept.append(self._entry(path, trial.last_result or {}))
            scored = [e for e in kept if e["score"] is not None]
            best = max(scored, key=lambda e: e["score"]) if scored else None
            now = time.monotonic()
            old = kept[:-latest] if latest else kept[:]
            for e, newer in list(zip(old, kept[1:])):
                if e["pinned"] or e is best or now - newer["t"] < grace_s:
                    continue
                try:
                    empty(fs, e["path"])
                except FileNotFoundError:
                    pass
                except OSError as exc:  # storage hiccup: try again with the next checkpoint
                    log.warning("fer-tune: could not delete %s: %s", e["path"], exc)
                    continue
                kept.remove(e)

    return Pruner()


# the names under which Tune states saved by earlier releases pickled these functions (a study's tuner.pkl)
_siblings, _read_meta, _empty = siblings, read_meta, empty
