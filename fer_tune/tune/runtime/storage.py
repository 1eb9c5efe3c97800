"""Ray storage for a study's experiment directories: a local/shared path or a pyarrow filesystem URI.

A study directory (results/NAME: study.json, space.yaml, optuna.db, trials.csv) always stays on the driver.
Ray Tune's experiment directories (trial results, checkpoints, experiment state) go to the study's *Ray
storage*: by default the study directory itself, or `--storage` (s3://bucket/prefix, gs://..., any URI
pyarrow.fs understands, or a path on a mount every node shares), where the study gets its own NAME folder.
study.json records it (`ray_storage`), and everything that reads experiment results goes through the few
functions here, so `resume`, `extend`, `status` and trials.csv work the same for every kind of storage.

Since Ray 2.7 a multi-node run needs storage every node reaches: `node_local_problem` says when it does not.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ...common import FerTuneError

# filesystems whose files other machines see (a path on one of them is shared storage)
NETWORK_FS = {
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "glusterfs",
    "afs",
    "9p",
    "virtiofs",
    "fuse.glusterfs",
    "fuse.s3fs",
    "fuse.gcsfuse",
    "fuse.juicefs",
    "fuse.mountpoint-s3",
    "fuse.sshfs",
    "fuse.cephfs",
    "fuse.geesefs",
    "fuse.goofys",
    "fuse.rclone",
    "fuse.blobfuse2",
}


def is_uri(loc: str | Path | None) -> bool:
    """True for a remote filesystem URI (s3://, gs://, ...); a plain path or file:// is local."""
    if loc is None or isinstance(loc, Path):
        return False
    scheme = urlsplit(str(loc)).scheme
    return "://" in str(loc) and scheme not in ("", "file")


def normalize(arg: str) -> str:
    """The --storage argument as it is recorded: a URI unchanged (no credentials in it), a path made absolute."""
    if "://" in arg:
        parts = urlsplit(arg)
        if parts.password or parts.username:
            raise FerTuneError(
                f"--storage {parts.scheme}://...@{parts.hostname}: the URI holds credentials, which "
                "would be written to study.json and Ray's experiment state; give the node "
                "credentials through the environment or an instance role instead"
            )
        if parts.scheme == "file":
            return str(Path(parts.path).resolve())
        if not parts.netloc:
            raise FerTuneError(f"--storage {arg}: the URI names no bucket or host (e.g. s3://BUCKET/PREFIX)")
        return arg.rstrip("/") if not parts.query else arg
    return str(Path(arg).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """Join path parts to a path or URI (a URI's ?query stays at the end)."""
    base = str(base)
    if is_uri(base):
        head, sep, query = base.partition("?")
        return "/".join([head.rstrip("/"), *parts]) + (sep + query)
    return str(Path(base, *parts))


def _fs(loc: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(loc)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise FerTuneError(f"storage {loc}: {exc}") from None


def filesystem(loc: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) of a local path or URI."""
    import pyarrow.fs as pafs

    if is_uri(loc):
        return _fs(str(loc))
    return pafs.LocalFileSystem(), str(Path(loc).resolve())


@contextmanager
def _reading(loc: str):
    """A remote storage this machine cannot read (credentials, network) -> one clear FerTuneError."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise
    except OSError as exc:
        raise FerTuneError(
            f"cannot read the Ray storage {loc}: {exc}; this machine needs access to it (credentials, network)"
        ) from None


def listdir(loc: str | Path) -> list[str]:
    """Names of the entries in a directory (empty if it does not exist)."""
    if not is_uri(loc):
        p = Path(loc)
        return sorted(e.name for e in os.scandir(p)) if p.is_dir() else []
    import pyarrow.fs as pafs

    fs, path = _fs(str(loc))
    try:
        with _reading(str(loc)):
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(i.base_name for i in infos)


def list_files(loc: str | Path) -> list[str]:
    """Every file under a directory, as paths relative to it ('a/b.json'); empty if it does not exist."""
    if not is_uri(loc):
        root = Path(loc)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    import pyarrow.fs as pafs

    fs, path = _fs(str(loc))
    try:
        with _reading(str(loc)):
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    base = path.rstrip("/") + "/"
    return sorted(i.path[len(base) :] for i in infos if i.type == pafs.FileType.File and i.path.startswith(base))


def exists(loc: str | Path) -> bool:
    if not is_uri(loc):
        return Path(loc).exists()
    import pyarrow.fs as pafs

    fs, path = _fs(str(loc))
    with _reading(str(loc)):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(loc: str | Path) -> str | None:
    """A file's text, or None if it does not exist."""
    data = read_bytes(loc)
    return None if data is None else data.decode(errors="replace")


def read_bytes(loc: str | Path) -> bytes | None:
    """A file's bytes, or None if it does not exist."""
    if not is_uri(loc):
        try:
            return Path(loc).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
    fs, path = _fs(str(loc))
    try:
        with _reading(str(loc)), fs.open_input_stream(path) as fh:
            return fh.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def size(loc: str | Path) -> int:
    """A file's size in bytes, 0 if it does not exist."""
    if not is_uri(loc):
        try:
            return Path(loc).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return 0
    fs, path = _fs(str(loc))
    with _reading(str(loc)):
        info = fs.get_file_info(path)
    return (info.size or 0) if info.is_file else 0


def write_text(loc: str, text: str) -> None:
    write_bytes(loc, text.encode())


def write_bytes(loc: str, data: bytes) -> None:
    """Write a file whole: a reader sees the old one or the new one (locally through a .NAME.part file, which
    readers of Tune's directories ignore; an object store's PUT is whole)."""
    if not is_uri(loc):
        path = Path(loc)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.part")
        part.write_bytes(data)
        os.replace(part, path)
        return
    fs, path = _fs(loc)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def delete(loc: str, *, tree: bool = False) -> None:
    if not is_uri(loc):
        if tree:
            import shutil

            shutil.rmtree(loc, ignore_errors=True)
        else:
            Path(loc).unlink(missing_ok=True)
        return
    fs, path = _fs(loc)
    try:
        fs.delete_dir(path) if tree else fs.delete_file(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------------------
# a study's experiment directories
# ---------------------------------------------------------------------------------------------------------
def study_storage(sdir: str | Path, record: dict) -> str:
    """Where the study's Ray experiments live: its recorded Ray storage, else the study directory itself (so a
    results/NAME copied to a laptop still reads)."""
    return record.get("ray_storage") or str(sdir)


def experiment_dir(sdir: str | Path, record: dict, run: dict) -> str:
    """One Ray experiment of the study (run = an entry of record["runs"]: tune, extend-1, ...)."""
    return join(study_storage(sdir, record), run["dir"])


def experiment_dirs(sdir: str | Path, record: dict) -> list[str]:
    """Every Ray experiment of the study, its runs' order (experiment_dir of each)."""
    return [experiment_dir(sdir, record, r) for r in record["runs"]]


# ---------------------------------------------------------------------------------------------------------
# multi-node clusters need storage every node reaches
# ---------------------------------------------------------------------------------------------------------
def filesystem_type(path: str | Path) -> str:
    """The type of the filesystem holding path (from /proc/mounts; '' where unknown)."""
    p = Path(path).resolve()
    best, fstype = "", ""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mnt = fields[1].replace("\\040", " ")
        if (str(p) == mnt or str(p).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, fields[2]
    return fstype


def node_local_problem(
    storage: str, nodes: int, *, grows: bool = False, fstype: str | None = None, unseen: int | None = None
) -> str | None:
    """None when `storage` suits a Ray cluster of `nodes` alive nodes (`grows`: trials will run on nodes an
    autoscaler adds); else one paragraph saying what was found and what to pass instead. A path is shared when
    its filesystem is a network one (`fstype`, read from /proc/mounts when None) or when `unseen` == 0 (every
    other node saw a file written there)."""
    if is_uri(storage) or (nodes <= 1 and not grows):
        return None
    fstype = filesystem_type(storage) if fstype is None else fstype
    if fstype in NETWORK_FS or unseen == 0:
        return None
    found = f"the Ray cluster has {nodes} alive nodes" if nodes > 1 else "the Ray cluster has one alive node"
    if grows:
        found += " and none has the resources a trial asks for, so trials will run on nodes its autoscaler adds"
    seen = f"; {unseen} of the other nodes did not see a probe file written there" if unseen else ""
    return (
        f"{found}, but the Ray storage {storage} is a path on this machine's own disk "
        f"({fstype or 'unknown filesystem'}{seen}). Since Ray 2.7 trials on other nodes write their "
        "checkpoints and results to the storage path, and there they fail with 'A local path on the head node "
        "is not accessible by worker nodes'. Pass --storage s3://BUCKET/PREFIX (or gs://..., any pyarrow "
        "filesystem URI the nodes have credentials for) or --storage /PATH on a mount every node shares (NFS, "
        "EFS); the study directory (study.json, optuna.db, trials.csv) stays on this machine either way. "
        "`fer-tune preflight --address auto --storage ...` checks a storage from every node."
    )
