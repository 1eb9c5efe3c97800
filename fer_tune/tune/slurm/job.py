"""What a SLURM job asks for, and the checks and SLURM client calls around it: --time, shared directories, the
partition (sinfo), sbatch, squeue."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ...common import FerTuneError
from ..runtime import storage as fs

_TIME = re.compile(r"^(?:(\d+)-(\d{1,2})(?::(\d{1,2})(?::(\d{1,2}))?)?|(\d+)(?::(\d{1,2})(?::(\d{1,2}))?)?)$")
# where a directory is on a node's own disk whatever its filesystem (a cluster's convention)
LOCAL_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/scratch/local", "/local")
MEMORY_FS = {"tmpfs", "ramfs", "devtmpfs"}


def parse_time(text: str) -> int:
    """Seconds of a SLURM --time value (MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS,
    DAYS-HOURS:MINUTES, DAYS-HOURS:MINUTES:SECONDS); FerTuneError otherwise."""
    m = _TIME.match(text.strip())
    if not m:
        raise FerTuneError(
            f"--time {text!r}: use D-HH:MM:SS (e.g. 1-12:00:00), HH:MM:SS or MINUTES, as sbatch --time takes it"
        )
    if m.group(1) is not None:
        days, hours, minutes, seconds = (int(g or 0) for g in m.group(1, 2, 3, 4))
        if hours > 23 or minutes > 59 or seconds > 59:
            raise FerTuneError(f"--time {text!r}: hours must be < 24, minutes and seconds < 60")
        total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    else:
        parts = [int(g) for g in m.group(5, 6, 7) if g is not None]
        if len(parts) == 3:
            total = (parts[0] * 60 + parts[1]) * 60 + parts[2]
            bad = parts[1] > 59 or parts[2] > 59
        else:
            total = parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)
            bad = len(parts) == 2 and parts[1] > 59
        if bad:
            raise FerTuneError(f"--time {text!r}: minutes and seconds must be < 60")
    if total <= 0:
        raise FerTuneError(f"--time {text!r}: the job needs some time")
    return total


@dataclass
class Job:
    """What the job asks SLURM for and how it behaves at its time limit."""

    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int = 4
    time: str = "1-00:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    setup: str | None = None
    sbatch_options: list[str] = field(default_factory=list)
    grace: int = 300
    max_requeues: int = 20

    def check(self) -> None:
        """FerTuneError for a value SLURM or the script cannot take."""
        if self.nodes < 1:
            raise FerTuneError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise FerTuneError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if self.cpus_per_node < 1:
            raise FerTuneError(f"--cpus-per-node must be >= 1, got {self.cpus_per_node}")
        if self.max_requeues < 0:
            raise FerTuneError(f"--max-requeues must be >= 0, got {self.max_requeues}")
        limit = parse_time(self.time)
        if self.grace < 10:
            raise FerTuneError(f"--grace must be >= 10 seconds (time to save the study), got {self.grace}")
        if self.grace >= limit:
            raise FerTuneError(
                f"--grace {self.grace} s is not shorter than --time {self.time} ({limit} s): the study would be "
                "stopped before it starts"
            )
        for opt in self.sbatch_options:
            if not opt.startswith("-") or "\n" in opt:
                raise FerTuneError(f"--sbatch-option {opt!r}: give one sbatch option, e.g. --constraint=a100")


def default_cpus(resources: dict, gpus_per_node: int, trials: int | None = None) -> int:
    """CPUs for one node: `trials` (default: those its GPUs hold, 4 without GPUs) times a trial's CPUs, and 1 for
    the driver."""
    per_trial = float(resources.get("cpu", 1) or 1)
    gpu = float(resources.get("gpu", 0) or 0)
    if trials is None:
        trials = int(gpus_per_node / gpu + 1e-9) if gpu and gpus_per_node else 4
    return max(2, math.ceil(trials * per_trial) + 1)


def check_fit(job: Job, resources: dict, unit: str) -> str | None:
    """FerTuneError for a job in which no trial (run, member) could start: Ray would wait for resources until the
    time limit, allocation after allocation. A warning when a node's CPUs run fewer of them than its GPUs hold."""
    cpu = float(resources.get("cpu", 0) or 0)
    gpu = float(resources.get("gpu", 0) or 0)
    if cpu > job.cpus_per_node:
        raise FerTuneError(
            f"each {unit} asks for {cpu:g} CPUs but a node of the job has {job.cpus_per_node} (--cpus-per-node): "
            f"no {unit} could start; give the nodes more CPUs or the {unit}s fewer"
        )
    if gpu > job.gpus_per_node > 0:
        raise FerTuneError(
            f"each {unit} asks for {gpu:g} GPUs but a node of the job has {job.gpus_per_node} (--gpus-per-node): "
            f"no {unit} could start; give the nodes more GPUs or the {unit}s fewer"
        )
    if gpu > 0 and cpu > 0:
        by_gpu, by_cpu = int(job.gpus_per_node / gpu + 1e-9), int(job.cpus_per_node / cpu + 1e-9)
        if by_cpu < by_gpu:
            return (
                f"a node's {job.cpus_per_node} CPUs run {by_cpu} {unit}(s) at once ({cpu:g} CPUs each), which use "
                f"{math.ceil(by_cpu * gpu - 1e-9)} of its {job.gpus_per_node} GPUs; to use them all, a node needs "
                f"{math.ceil(by_gpu * cpu) + 1} CPUs (--cpus-per-node), or the {unit}s fewer CPUs each"
            )
    return None


# ---------------------------------------------------------------------------------------------------------
# checks before the job is written or submitted
# ---------------------------------------------------------------------------------------------------------
def node_local(path: str | Path) -> str | None:
    """Why `path` is certainly on one node's own disk (a memory filesystem, /tmp, ...), else None."""
    p = Path(path).resolve()
    fstype = fs.filesystem_type(p)
    if fstype in MEMORY_FS:
        return f"a {fstype} (memory) filesystem"
    for d in LOCAL_DIRS:
        if p == Path(d) or Path(d) in p.parents:
            return f"under {d}, a node's own disk on a cluster"
    return None


def check_shared(what: str, path: str, nodes: int) -> None:
    """Refuse (FerTuneError) a study directory or Ray storage that the other nodes of a multi-node job cannot
    see; a URI (s3://...) is always fine. The job checks the rest from every node before training."""
    if nodes <= 1 or fs.is_uri(path):
        return
    why = node_local(path)
    if why:
        raise FerTuneError(
            f"{what} {path} is {why}, which the other {nodes - 1} node(s) of the job do not see; put it on a "
            "filesystem every node mounts (--results DIR on your home or project space"
            + (", --storage s3://BUCKET/PREFIX or a shared DIR" if what == "the Ray storage" else "")
            + ") or run on one node (--nodes 1)"
        )


# where SLURM's clients find their configuration (SLURM_CONF first; a configless client's cache last)
CONFIGS = (
    "/etc/slurm/slurm.conf",
    "/etc/slurm-llnl/slurm.conf",
    "/usr/local/etc/slurm.conf",
    "/run/slurm/conf/slurm.conf",
)


def slurm_configured() -> bool:
    """Whether this machine's SLURM clients have a configuration to read (without one, sinfo looks for a
    controller in DNS for tens of seconds)."""
    conf = os.environ.get("SLURM_CONF")
    return Path(conf).is_file() if conf else any(Path(c).is_file() for c in CONFIGS)


def _run(argv: list[str], timeout: float = 15.0) -> subprocess.CompletedProcess | None:
    """A SLURM client command; None when it is not installed, not configured or cannot answer."""
    if shutil.which(argv[0]) is None or not slurm_configured():
        return None
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _gres_gpus(gres: str) -> int:
    """GPUs in a node's gres string ('gpu:a100:4(S:0-1),nic:1' -> 4)."""
    total = 0
    for part in gres.split(","):
        part = re.sub(r"\(.*?\)", "", part).strip()
        if part.startswith("gpu"):
            count = part.rsplit(":", 1)[-1]
            total += int(count) if count.isdigit() else 1
    return total


def check_partition(job: Job, default_cpus: bool = False) -> None:
    """Where SLURM answers (sinfo): refuse a partition it does not know, and more nodes, CPUs or GPUs per node
    than the partition's nodes have (`default_cpus`: job.cpus_per_node is a default, lowered to what the nodes
    have). Silent where sinfo is missing or fails (a script written off the cluster)."""
    r = _run(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%G"])
    if r is None or r.returncode != 0 or not r.stdout.strip():
        return
    nodes: dict[str, dict] = {}
    default = None
    parts: set[str] = set()
    for line in r.stdout.splitlines():
        try:
            part, node, cpus, gres = line.split("|")
        except ValueError:
            continue
        if part.endswith("*"):
            part = default = part[:-1]
        parts.add(part)
        nodes.setdefault(part, {})[node] = (int(re.sub(r"\D.*", "", cpus) or 0), _gres_gpus(gres))
    part = job.partition or default
    if part is None:
        return
    if part not in nodes:
        raise FerTuneError(f"SLURM has no partition {part!r} (sinfo lists: {', '.join(sorted(parts))})")
    members = nodes[part].values()
    if default_cpus:
        most = max((c for c, g in members if g >= job.gpus_per_node), default=job.cpus_per_node)
        job.cpus_per_node = max(1, min(job.cpus_per_node, most))
    if job.nodes > len(members):
        raise FerTuneError(f"--nodes {job.nodes}: partition {part} has {len(members)} node(s)")
    fit = [n for n in members if n[0] >= job.cpus_per_node and n[1] >= job.gpus_per_node]
    if len(fit) < job.nodes:
        most_gpus = max(g for _, g in members)
        most_cpus = max(c for c, _ in members)
        if job.gpus_per_node > most_gpus:
            raise FerTuneError(
                f"--gpus-per-node {job.gpus_per_node}: the nodes of partition {part} have at most {most_gpus} GPU(s)"
                + (" (none configured)" if most_gpus == 0 else "")
            )
        if job.cpus_per_node > most_cpus:
            raise FerTuneError(
                f"--cpus-per-node {job.cpus_per_node}: the nodes of partition {part} have at most {most_cpus} CPUs"
            )
        raise FerTuneError(
            f"partition {part} has {len(fit)} node(s) with {job.cpus_per_node} CPUs and {job.gpus_per_node} GPU(s); "
            f"--nodes {job.nodes} asks for more"
        )


def submit(script: Path) -> str:
    """sbatch the script; its job id. sbatch's refusal becomes one FerTuneError line."""
    if shutil.which("sbatch") is None:
        raise FerTuneError(
            f"sbatch is not on PATH: --submit needs a SLURM login node; the script is written, submit it there with "
            f"sbatch {script}"
        )
    try:
        r = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise FerTuneError(f"sbatch did not answer within 2 minutes; the script is written: sbatch {script}") from None
    if r.returncode != 0:
        lines = [line.strip() for line in r.stderr.splitlines() if line.strip()]
        why = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        why = re.sub(r"^sbatch:\s*(error:\s*)?", "", why)
        raise FerTuneError(f"sbatch refused the job: {why or f'exit {r.returncode}'}")
    return r.stdout.strip().split(";")[0]


def squeue_entry(job_id: str) -> tuple[str, str] | None:
    """(state, its nodes when RUNNING or its reason otherwise, "" for none) as squeue says it, or None when SLURM
    does not know the job (or cannot be asked)."""
    r = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T|%R"], timeout=10)
    if r is None or r.returncode != 0 or not r.stdout.strip():
        return None
    state, _, where = r.stdout.strip().splitlines()[0].partition("|")
    return state, "" if where == "None" else where


def study_job(record: dict) -> dict | None:
    """{"job_id", "state", "nodes" or "reason"} of the SLURM job the study's last session ran in, while squeue
    still knows it; None otherwise (`status --json`'s `slurm_job`)."""
    runs = record.get("runs") or [{}]
    job = next((s["slurm"] for s in reversed(runs[-1].get("sessions", [])) if s.get("slurm")), None)
    entry = squeue_entry(job["job_id"]) if job else None
    if entry is None:
        return None
    state, where = entry
    return {"job_id": str(job["job_id"]), "state": state, "nodes" if state == "RUNNING" else "reason": where}


def study_job_line(record: dict) -> str | None:
    """'SLURM job 123 (the study's last session): RUNNING on n[1-2]' for a study whose last session ran in a SLURM
    job that squeue still knows; None otherwise."""
    job = study_job(record)
    if job is None:
        return None
    state = f"RUNNING on {job['nodes']}" if job["state"] == "RUNNING" else job["state"]
    if job.get("reason"):
        state += f" ({job['reason']})"
    return f"SLURM job {job['job_id']} (the study's last session): {state}"
