"""One driver per study: `sweep`, `resume`, `extend` and `final` hold an exclusive lock for their whole run.

The lock is DIR/.lock: an advisory flock(2) on it, held while the command runs, and a line of JSON in it saying
who holds it (host, PID, the PID's start time, the command, since when). The kernel drops the flock when its
process ends, however it ends, so on one machine a lock is never stale: a file that still names a holder but
whose flock is free was left by a process that is gone (killed, crashed) and is taken over with a note. A holder
on another machine (a study directory on a shared mount) cannot be checked from here: it is respected unless the
command is given --force.

Readers (`status`, `report`) never take the flock, so they cannot disturb a running command: `holder()` reads the
file and checks the process where it can.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from ...common import FerTuneError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
COMMAND = "fer-tune"  # the command line a lock records (the CLI sets it)


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (field 3, the state, first), or [] when unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return []


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): a PID reused by another
    process has another start time."""
    try:
        return int(_stat(pid)[19])
    except (IndexError, ValueError):
        return None


def running_here(info: dict) -> bool:
    """True when the process that `info` names runs on this machine (same PID and start time)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    fields = _stat(pid)
    if fields[:1] in (["Z"], ["X"]):  # ended, not yet reaped by its parent: it holds no flock any more
        return False
    recorded = info.get("start_ticks")
    return recorded is None or (len(fields) > 19 and fields[19] == str(recorded))


def _parse(text: str) -> dict | None:
    try:
        info = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def describe(info: dict) -> str:
    """'`fer-tune resume results/x` (PID 123 on host-1, since 2026-12-01 10:00:00)'."""
    return (
        f"`{info.get('command', '?')}` (PID {info.get('pid', '?')} on {info.get('host', '?')}, "
        f"since {info.get('since', '?')})"
    )


def running_line(what: str, info: dict) -> str:
    """'the study is being run now by `fer-tune resume ...` (PID ...)' for a holder() of a study's lock (what:
    "study") or of its final stage's ("final")."""
    part = "the study" if what == "study" else "its final stage"
    if info.get("verified"):
        return f"{part} is being run now by {describe(info)}"
    return f"{part} is locked by {describe(info)}, on another machine (not checked from here)"


def holder(directory: str | Path) -> dict | None:
    """Who runs the study in `directory` now, without touching its lock: the holder's record with `verified`
    (True: a live process on this machine; False: recorded by another machine, which cannot be checked from
    here), or None when nobody does. The calling process itself never counts."""
    try:
        info = _parse((Path(directory) / LOCK_FILE).read_text())
    except OSError:
        return None
    if not info:
        return None
    if info.get("host") == socket.gethostname():
        if info.get("pid") == os.getpid() or not running_here(info):
            return None
        return {**info, "verified": True}
    return {**info, "verified": False}


class Lock:
    """A held lock; release() (or leaving the `with` block) gives it up."""

    def __init__(self, path: Path, fd: int, cleanup: list[Path]):
        self.path, self._fd, self._cleanup = path, fd, cleanup

    def release(self) -> None:
        """Empty the record and drop the flock (safe to call twice, and from a signal handler)."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # drops the flock
        _HELD.pop(str(self.path), None)
        if self._cleanup and not any(e.name != LOCK_FILE for e in os.scandir(self._cleanup[0])):
            # the command created the directory and wrote nothing else to it (it was refused): leave no trace
            self.path.unlink(missing_ok=True)
            for d in self._cleanup:  # the directory, then the parents the command created for it
                try:
                    d.rmdir()
                except OSError:
                    break

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[str, Lock] = {}  # the locks this process holds (a signal handler releases them before a hard exit)


def release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


def acquire(directory: str | Path, *, what: str, force: bool | None = False, create: bool = False) -> Lock:
    """Take the lock of `directory` for a command that runs `what` ('the study', 'the final stage'); refused with
    one FerTuneError when a live command holds it, or when a command on another machine does and `force` is not
    given (None: the command has no --force). `create`: make the directory (and its parents) if needed; releasing
    the lock removes what was made when nothing else was written to the directory."""
    d = Path(directory).resolve()
    made = [p for p in (d, *d.parents) if not p.exists()] if create else []  # deepest first
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise FerTuneError(f"cannot create the lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise FerTuneError(f"cannot lock {path}: {exc.strerror}") from None
        info = None
        for _ in range(20):  # the holder may be writing its record right now
            try:
                info = _parse(path.read_text())
            except OSError:
                info = None
            if info:
                break
            time.sleep(0.05)
        who = describe(info) if info else "another command"
        raise FerTuneError(
            f"{d}: {what} is being run by {who}; wait for it to end, or stop it (Ctrl-C or kill "
            f"{info.get('pid', 'PID') if info else 'PID'}; it saves its state) and resume"
        ) from None
    note = None
    old = _parse(os.pread(fd, 65536, 0).decode(errors="replace"))
    me = socket.gethostname()
    if old and old.get("pid") is not None:
        if old.get("host") == me:
            note = f"note: {d}: took over the lock left by {describe(old)}, which is no longer running"
        elif not force:
            os.close(fd)
            fix = "pass --force" if force is not None else f"delete {path}"
            raise FerTuneError(
                f"{d}: {what} is locked by {describe(old)}, on another machine, which cannot be "
                f"checked from here; if that command is no longer running, {fix}"
            )
        else:
            note = f"note: {d}: --force: took over the lock held by {describe(old)}"
    info = {
        "host": me,
        "pid": os.getpid(),
        "start_ticks": _start_ticks(os.getpid()),
        "command": COMMAND,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    if note:
        log.warning(note)
    lock = Lock(path, fd, made)
    _HELD[str(path)] = lock
    return lock
