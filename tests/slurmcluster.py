"""A private 2-node SLURM cluster on this one host, for the tests and benchmarks/bench_slurm.py.

Everything lives in one directory: a munge key and its own munged (own socket), slurm.conf (SLURM_CONF points the
clients at it), slurmctld and one slurmd per node (`-N n1`, `-N n2`, each with its own spool, pid and log file),
on ports of their own. Nothing in /etc is read or changed, so it runs beside a system SLURM. Needs root (slurmd
runs jobs as their user) and Debian's slurm-wlm and munge; `available()` says why not otherwise. `stop()` ends
the daemons it started, by PID.

    python tests/slurmcluster.py DIR     # start one and keep it until Ctrl-C (prints the SLURM_CONF to export)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo")


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin", "/sbin") if (p := Path(d) / name).is_file()), None
    )


def available() -> str | None:
    """None when a private cluster can be started here, else why not (for a skip)."""
    if os.geteuid() != 0:
        return "the private SLURM cluster needs root (slurmd runs jobs as their user)"
    missing = [d for d in DAEMONS if _which(d) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing: apt-get install slurm-wlm munge)"
    return None


def _free_ports(n: int) -> list[int]:
    """n consecutive free TCP ports (slurmd's Port=A-B range needs them in a row)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("", 0))
            base = s.getsockname()[1]
        if base + n >= 65000:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + n))
    raise RuntimeError("no free ports for the SLURM daemons")


class SlurmCluster:
    """munged + slurmctld + `nodes` slurmd on this host, configured in `root`; `env` is the environment for the
    SLURM clients (sbatch, squeue, scontrol, sacct, and fer-tune slurm --submit)."""

    def __init__(self, root: str | Path, nodes: int = 2, cpus: int = 1, cred_expire: int = 5):
        self.root = Path(root).resolve()
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus, self.cred_expire = cpus, cred_expire
        # job ids of its own: what a job leaves on this host (Ray's /tmp/rjJOB_* dirs) never meets another run's
        self.first_job = 1000 * int.from_bytes(os.urandom(2), "little") + 1000
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.procs: dict[str, int] = {}  # daemon name -> PID
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -----------------------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        host = socket.gethostname()
        ctld, *node_ports = _free_ports(1 + len(self.nodes))
        for d in ("munge", "state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(
            f"""\
ClusterName=fertune-test
SlurmctldHost={host}
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire={self.cred_expire}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
KillWait=10
FirstJobId={self.first_job}
MinJobAge=600
InactiveLimit=0
MessageTimeout=10
NodeName={",".join(self.nodes) if len(self.nodes) < 2 else f"n[1-{len(self.nodes)}]"} NodeHostname={host} \
Port={node_ports[0]}-{node_ports[-1]} CPUs={self.cpus} RealMemory=10000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start_munge(self) -> None:
        m = self.root / "munge"
        key = m / "munge.key"
        if not key.exists():
            subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o600)
        m.chmod(0o700)
        subprocess.run(
            [
                _which("munged"),
                "--force",  # as root, with a key and a socket of its own
                f"--socket={m}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={m}/munged.pid",
                f"--log-file={m}/munged.log",
                f"--seed-file={m}/munged.seed",
            ],
            check=True,
            capture_output=True,
        )
        self.procs["munged"] = self._pid(m / "munged.pid")

    def _pid(self, path: Path, within: float = 20.0) -> int:
        deadline = time.time() + within
        while time.time() < deadline:
            try:
                return int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)
        raise RuntimeError(f"{path} did not appear; see the logs in {self.root}")

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        """Start the daemons and wait until every node is idle."""
        why = available()
        if why:
            raise RuntimeError(why)
        self._write_config()
        self._start_munge()
        env = self.env
        subprocess.run([_which("slurmctld"), "-f", str(self.conf), "-i"], check=True, env=env, capture_output=True)
        self.procs["slurmctld"] = self._pid(self.root / "run" / "slurmctld.pid")
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(parents=True, exist_ok=True)
            subprocess.run([_which("slurmd"), "-f", str(self.conf), "-N", n], check=True, env=env, capture_output=True)
            self.procs[f"slurmd-{n}"] = self._pid(self.root / "run" / f"slurmd-{n}.pid")
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if r.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the SLURM nodes did not become idle within {timeout:.0f} s: {r.stdout}{r.stderr}")

    def cancel_all(self, within: float = 30.0) -> None:
        """Cancel every job and wait (up to `within` s) until the queue is empty: a job's steps end before their
        slurmd does (else a slurmstepd waits for that slurmd for ever), and before a test removes their files."""
        if "slurmctld" not in self.procs:
            return
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
        deadline = time.time() + within
        while time.time() < deadline:
            r = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True, timeout=30)
            if r.returncode or not r.stdout.strip():
                break
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this object started (slurmd first, munged last), by PID."""
        self.cancel_all()
        order = [k for k in self.procs if k.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            pid = self.procs.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 15
            while time.time() < deadline and _running(pid):
                time.sleep(0.1)
            if _running(pid):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -----------------------------------------------------------------------------------------------------
    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command (squeue, scontrol, ...) against this cluster."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, RunTime, Restarts, NodeList, ...); {} once it is forgotten."""
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        out = {}
        for field in r.stdout.split():
            k, _, v = field.partition("=")
            out.setdefault(k, v)
        return out

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict:
        """Wait until the job is in one of `states` (RUNNING, COMPLETED, ...); its `job()`."""
        deadline = time.time() + timeout
        info: dict = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} not in {states} within {timeout:.0f} s: {info.get('JobState')}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    import sys

    c = SlurmCluster(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm-fertune").start()
    print(f"export SLURM_CONF={c.conf}   # daemons: {c.procs}; Ctrl-C or SIGTERM stops them", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))  # also when started in the background
    try:
        signal.pause()
    finally:
        c.stop()
