"""A throw-away PostgreSQL server for the tests: its own cluster (initdb) in a temp dir, on a free loopback port,
password (scram-sha-256) authentication, started and stopped with pg_ctl by the test that uses it. As root (CI),
the server runs as the `postgres` user Debian's package creates (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def pg_bin() -> Path | None:
    """The directory of initdb / pg_ctl: on PATH, else Debian's /usr/lib/postgresql/N/bin (newest)."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    return Path(dirs[-1]) if dirs and Path(dirs[-1], "initdb").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """start() / halt() / close(); url(db): a SQLAlchemy URL with the password; create_db(name)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="fer-tune-pg-", dir="/tmp"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = _free_port()
        self.user = "fertune"
        self.password = "pw-" + secrets.token_hex(12)
        self.as_root = os.geteuid() == 0
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", self.data, "-U", self.user, "--auth=scram-sha-256", "--pwfile", self._pwfile())

    def _pwfile(self) -> Path:
        f = self.root / "pw"
        f.write_text(self.password + "\n")
        if self.as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(f, pw.pw_uid, pw.pw_gid)
        return f

    def _run(self, tool: str, *args) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / tool), *map(str, args)]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{tool}: {r.stdout}{r.stderr}" + (self.log.read_text() if self.log.exists() else "")
        return r

    def _pg_ctl(self, action: str, *extra: str) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root}"
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60", action, *extra)

    def start(self) -> None:
        self._pg_ctl("start")

    def halt(self) -> None:
        """Stop the server (a fast shutdown: connections are cut); start() brings it back with its data."""
        self._pg_ctl("stop", "-m", "fast")

    def close(self) -> None:
        """Stop the server if it runs and remove its cluster."""
        if (self.data / "postmaster.pid").exists():
            self.halt()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
