"""In the job, before the driver: wait for every node's Ray, check what the nodes see, release a lock that this
job's earlier allocation left. Run by the batch script as `python -m fer_tune.tune.slurm.ready ...`."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from ...common import FerTuneError
from .script import DRIVER_MARK

log = logging.getLogger(__name__)


LINGER_S = 120.0  # how long an allocation waits for this job's earlier driver, still ending on its node


def release_stale_lock(study: Path, allocation: int, linger: float = LINGER_S) -> None:
    """A driver of this job's earlier allocation that SLURM killed (it overran the grace time) leaves the lock of
    `study` (a study's or a final stage's directory) naming its host and PID; that allocation is over, so the
    record is emptied (lock.py would take it for a command on another machine when this allocation's first node
    is another). Where that driver still runs on this node (SLURM started the job again before it had ended), this
    waits up to `linger` seconds for it to end, which frees the lock; after that the lock is left to refuse."""
    import socket

    from ..runtime.lock import LOCK_FILE, running_here

    try:
        mark = json.loads((study / DRIVER_MARK).read_text())
        held = json.loads((study / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return
    if not isinstance(mark, dict) or not isinstance(held, dict):
        return
    if not (
        str(mark.get("job_id")) == os.environ.get("SLURM_JOB_ID")
        and int(mark.get("allocation", allocation)) < allocation
        and (held.get("host"), held.get("pid")) == (mark.get("host"), mark.get("pid"))
    ):
        return
    earlier = int(mark["allocation"]) + 1
    if held.get("host") == socket.gethostname() and running_here(held):
        log.warning(
            "fer-tune slurm: this job's allocation %d's driver (PID %s) is still ending; waiting up to %.0f s for "
            "it to release the lock of %s",
            earlier,
            held.get("pid"),
            linger,
            study,
        )
        deadline = time.monotonic() + linger
        while running_here(held) and time.monotonic() < deadline:
            time.sleep(0.2)
        if running_here(held):
            return
    (study / LOCK_FILE).write_text("")
    log.warning(
        "fer-tune slurm: released the lock of %s left by this job's allocation %d (PID %s on %s), which SLURM ended",
        study,
        earlier,
        held.get("pid"),
        held.get("host"),
    )


def _wait_for_gcs(address: str, timeout: float) -> None:
    import socket

    host, _, port = address.rpartition(":")
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError:
            if time.time() > deadline:
                raise FerTuneError(f"Ray's head did not come up at {address} within {timeout:.0f} s") from None
            time.sleep(0.5)


def ready(address: str, nodes: int, study: Path, storage: str | None, data: str | None, timeout: float = 300.0) -> None:
    """Wait until `nodes` Ray nodes are alive at `address`, then check from every one (fer-tune preflight) that
    it sees the study directory and the Ray storage (and the data); FerTuneError with the failures otherwise."""
    from ..runtime.preflight import alive_nodes
    from ..runtime.preflight import run as preflight
    from ..runtime.session import ray_session

    start = time.time()
    _wait_for_gcs(address, timeout)
    with ray_session(address):
        while len(alive_nodes()) < nodes:
            if time.time() - start > timeout:
                logs = os.environ.get("RAY_LOGS")  # the batch script's: where each node's `ray start` writes
                raise FerTuneError(
                    f"only {len(alive_nodes())} of the job's {nodes} nodes joined Ray within {timeout:.0f} s (each "
                    f"node's `ray start` output: {logs + '.N.log' if logs else 'see the job log'})"
                )
            time.sleep(0.5)
        up = time.time() - start
        failures: list[str] = []
        if nodes > 1:
            study.mkdir(parents=True, exist_ok=True)
            for loc in [str(study), *([storage] if storage else [])]:
                report = preflight(address=address, storage=loc, data=data, timeout=120)
                failures += [f for f in report["failures"] if f not in failures]
        if failures:
            raise FerTuneError(
                f"the job's nodes are not ready for the study ({len(failures)} problem(s)): " + "; ".join(failures)
            )
    log.warning(
        "fer-tune slurm: Ray is up on %d node(s) in %.1f s%s",
        nodes,
        up,
        (f"; every node sees {study}" + (f" and {storage}" if storage else "")) if nodes > 1 else "",
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m fer_tune.tune.slurm.ready ...`: the job's check before the driver starts; exit 2 with one line
    when the nodes are not ready."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fer_tune.tune.slurm.ready", description="run by the batch script")
    p.add_argument("--address", required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--lock-dir", default=None)
    p.add_argument("--allocation", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", stream=sys.stdout, level=logging.WARNING)
    try:
        release_stale_lock(Path(args.lock_dir or args.study), args.allocation)
        ready(args.address, args.nodes, Path(args.study), args.storage, args.data, args.timeout)
    except FerTuneError as exc:
        log.error("fer-tune: error: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
