"""The batch script: plain bash, commented, meant to be read and edited (see fer_tune/tune/slurm/__init__.py)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from ..runtime.internals import PRESTART_ENV as PRESTART
from .job import Job

SCRIPT = "slurm.sbatch"
DRIVER_MARK = ".slurm-driver"  # the job, host and PID of the driver this job started last (ready.release_stale_lock)


def _q(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def python_and_ray(setup: str | None) -> tuple[str, str]:
    """How the nodes run Python and Ray's CLI: this environment's, by absolute path (a shared mount); with
    --setup (which activates an environment) whatever it puts on PATH."""
    if setup:
        return "python", "ray"
    py = Path(sys.executable)
    ray = py.with_name("ray")
    return str(py), str(ray) if ray.exists() else "ray"


def render(
    job: Job,
    *,
    what: str,
    study: Path,
    log_dir: Path,
    first: list[str],
    again: list[str],
    name: str,
    stage: str = "study",
    storage: str | None = None,
    data: str | None = None,
    workdir: Path | None = None,
    command: str = "",
) -> str:
    """The batch script. `first`: the fer-tune arguments of the first allocation (sweep ...); `again`: of every
    later one, once `study`/study.json exists (resume ...); the same for a final or PBT stage, which continues
    itself. `stage`: what the driver finishes ("study", "final stage", "PBT stage"). `storage`, `data`: what the
    job checks every node sees besides the study directory."""
    python, ray = python_and_ray(job.setup)
    workdir = workdir or Path.cwd()
    gpus = f"#SBATCH --gres=gpu:{job.gpus_per_node}\n" if job.gpus_per_node else ""
    opt = "".join(
        f"#SBATCH --{k}={v}\n"
        for k, v in (("partition", job.partition), ("account", job.account), ("qos", job.qos))
        if v
    )
    extra = "".join(f"#SBATCH {o}\n" for o in job.sbatch_options)
    check = [python, "-m", "fer_tune.tune.slurm.ready", "--study", str(study), "--lock-dir", str(log_dir)]
    check += ["--storage", storage] if storage else []
    check += ["--data", data] if data and not data.startswith("synthetic") else []
    setup = job.setup.strip() if job.setup else ""
    if first == again:
        runs = f"`fer-tune {first[0]}`, which continues the {stage} where the last allocation left it."
    else:
        runs = f"`fer-tune {first[0]}` the first time, `fer-tune {again[0]}` once {study.name}/study.json exists."
    return f"""\
#!/bin/bash
# {what} as a SLURM job, written by `{command or "fer-tune slurm"}`
# on {time.strftime("%Y-%m-%d %H:%M")}. Edit it as you need; submit it with: sbatch {log_dir / SCRIPT}
#
# What it does, in every allocation of the job:
#  1. starts Ray on the job's nodes: the head here on the first node, the other nodes join through srun; on
#     ports and temp dirs of this job (from SLURM_JOB_ID), with token authentication: a random token made
#     here, handed to the other nodes by srun in the environment, never written to a file;
#  2. waits for every node and checks from each that it sees the study directory{" and the Ray storage" if storage else ""}
#     (fer-tune preflight's checks; one line and exit 2 otherwise);
#  3. runs the driver here: {runs}
# {job.grace} s before the time limit SLURM sends USR1 to this script (--signal below). The script sends SIGTERM to
# the driver, which stops the trials, saves the {stage} and exits 143; then the script requeues the job (at most
# MAX_REQUEUES times, counted by SLURM_RESTART_COUNT) and the next allocation continues it. A finished {stage} (exit 0)
# ends the chain; so does `scancel` (sbatch it again to continue). To stop and requeue the job by hand the same
# way: scancel --batch --signal=USR1 JOBID. A preemption or `scontrol requeue` sends SIGTERM to every process of
# the job at once, Ray's too: SLURM requeues it (a preemption only where the cluster's PreemptMode is REQUEUE;
# CANCEL ends the chain: sbatch this script again) and the {stage} continues from its last saved state (Tune
# saves it every few seconds; each trial from its last checkpoint).
# Every allocation appends to the log below{" and is one session in study.json (with the job id)" if stage == "study" else ""}.
# Follow it: squeue -j JOBID; tail -f {log_dir}/slurm-JOBID.log; fer-tune status {study}
#
#SBATCH --job-name=fer-tune-{name}
#SBATCH --nodes={job.nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task={job.cpus_per_node}
{gpus}#SBATCH --time={job.time}
{opt}#SBATCH --chdir={workdir}
#SBATCH --output={log_dir}/slurm-%j.log
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@{job.grace}
{extra}
STUDY={shlex.quote(str(study))}
FIRST=({_q(first)})
AGAIN=({_q(again)})
CHECK=({_q(check)})
FER_TUNE=({_q([python, "-m", "fer_tune.cli"])})
export RAY_BIN={shlex.quote(ray)}
export CPUS_PER_NODE={job.cpus_per_node} GPUS_PER_NODE={job.gpus_per_node}
MAX_REQUEUES={job.max_requeues}
# more options for every `ray start` (e.g. --object-store-memory=20000000000): RAY_START_ARGS in the environment
export RAY_START_ARGS="${{RAY_START_ARGS:-}}"
# Ray's object store: 30 % of the job's memory on a node where SLURM says it (--mem, --mem-per-cpu, --mem-per-gpu),
# not Ray's default of 30 % of the node's, which a job's memory limit may not hold
job_mb=${{SLURM_MEM_PER_NODE:-}}
[ -z "$job_mb" ] && [ -n "${{SLURM_MEM_PER_CPU:-}}" ] && job_mb=$((SLURM_MEM_PER_CPU * CPUS_PER_NODE))
[ -z "$job_mb" ] && [ -n "${{SLURM_MEM_PER_GPU:-}}" ] && job_mb=$((SLURM_MEM_PER_GPU * GPUS_PER_NODE))
export RAY_OBJECT_STORE=""
[ "${{job_mb:-0}}" -gt 0 ] && RAY_OBJECT_STORE=--object-store-memory=$((job_mb * 1048576 * 3 / 10))

# the nodes' software environment
{setup or "# (none given: the environment sbatch was called from; --setup 'module load ...; source .venv/bin/activate')"}

say() {{ echo "fer-tune slurm [$(date '+%F %T')]: $*"; }}
allocation=${{SLURM_RESTART_COUNT:-0}}
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
say "job $SLURM_JOB_ID, allocation $((allocation + 1)) (requeued $allocation of at most $MAX_REQUEUES times), \\
nodes ${{nodes[*]}}"

# ---- Ray across the allocation ---------------------------------------------------------------------------
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \\n')
export RAY_AUTH_TOKEN
export RAY_DIRS=/tmp/rj${{SLURM_JOB_ID}}_$allocation        # short: Ray's socket paths must fit in 107 characters
export RAY_LOGS={shlex.quote(str(log_dir))}/ray-${{SLURM_JOB_ID}}_$allocation  # each node's `ray start` output
# the head's address; its port and Ray Client's (the next one) from the job id, 20000 + JOBID % 1000 * 40, or the
# first such pair after it that is free on this node (another job's, or a connection's, on a shared node); Ray
# picks its other ports itself. Ray Client's port only where Ray Client is installed (else Ray refuses the option).
read -r RAY_HEAD_IP RAY_PORT client < <({python} - "$SLURM_JOB_ID" <<'PY'
import socket, sys
from ray._private.utils import get_ray_client_dependency_error as missing
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.connect(("10.255.255.255", 1)); ip = s.getsockname()[0]
except OSError:
    ip = socket.gethostbyname(socket.gethostname())
def free(port):
    with socket.socket() as t:
        try:
            t.bind(("", port))
        except OSError:
            return False
        return True
slots = [20000 + (int(sys.argv[1]) + k) % 1000 * 40 for k in range(1000)]
print(ip, next((p for p in slots if free(p) and free(p + 1)), slots[0]), "yes" if missing() is None else "no")
PY
)
export RAY_HEAD_IP RAY_PORT
client_port=()
[ "$client" = yes ] && client_port=(--ray-client-server-port=$((RAY_PORT + 1)))
ray_node() {{  # ray_node INDEX OPTIONS: Ray on this node until the job ends, with a temp dir and agent port of its
    # own. On the other nodes, stopped by SLURM's SIGTERM (scancel, a preemption, `scontrol requeue`: every process of
    # the job gets it, and this script may be killed before stop_ray), it removes its temp dir; one that ended on
    # its own (it did not join, it crashed) keeps it for its logs. The head's goes in stop_ray, once the driver,
    # which stages the study's state in it, has ended. No drain on SIGTERM: it waits up to 30 s for a head that
    # stops too. No idle Python workers for the first driver that connects (the check below): Ray would start one
    # per CPU of the node, and the study's trials start workers of their own (to have them, set
    # {PRESTART}=1 in the environment).
    local id=$1 pid stopped=0
    shift
    # shellcheck disable=SC2086
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 {PRESTART}="${{{PRESTART}:-0}}" \\
        "$RAY_BIN" start --block --temp-dir="$RAY_DIRS.$id" \\
        --num-cpus="$CPUS_PER_NODE" --num-gpus="$GPUS_PER_NODE" --dashboard-agent-listen-port=$((RAY_PORT + 2 + id % 38)) \\
        --disable-usage-stats "$@" $RAY_OBJECT_STORE $RAY_START_ARGS >"$RAY_LOGS.$id.log" 2>&1 &
    pid=$!
    trap 'stopped=1; kill -TERM $pid 2>/dev/null' TERM
    while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done  # a trap ends `wait`: wait again
    [ "$stopped" = 1 ] && [ "$id" != 0 ] && rm -rf "$RAY_DIRS.$id"
}}
earlier_dirs() {{  # what SLURM left of this job's earlier allocations on this node (a killed Ray's temp dirs)
    local a
    for ((a = 0; a < allocation; a++)); do rm -rf "/tmp/rj${{SLURM_JOB_ID}}_$a".*; done
}}
export allocation
export -f ray_node earlier_dirs
earlier_dirs
ray_node 0 --head --port="$RAY_PORT" "${{client_port[@]}}" --include-dashboard=false \\
    --node-ip-address="$RAY_HEAD_IP" &
ray_pids=($!)
if [ "${{#nodes[@]}}" -gt 1 ]; then  # SLURM_NODEID counts the step's nodes: 0 .. nodes - 2
    # the node's CPUs and memory for its Ray, asked for again: srun does not take sbatch's --cpus-per-task (SLURM
    # 22.05 to 23.02), and a task of one CPU is bound to one core where the cluster binds tasks to cores; the
    # environment (the token, the functions below) whatever --export the job was submitted with
    srun --overlap --nodes=$((${{#nodes[@]}} - 1)) --ntasks=$((${{#nodes[@]}} - 1)) --ntasks-per-node=1 \\
        --cpus-per-task="$CPUS_PER_NODE" --mem=0 --export=ALL --exclude="$SLURMD_NODENAME" --kill-on-bad-exit=0 \\
        bash -c 'earlier_dirs; ray_node $((SLURM_NODEID + 1)) --address="$RAY_HEAD_IP:$RAY_PORT"' \\
        2>"$RAY_LOGS.srun.log" &
    ray_pids+=($!)
fi
stop_ray() {{  # this job's Ray only (`ray stop` would stop every Ray of this user on the node); its temp dirs and
    # start-up logs are kept when a node did not join
    kill -TERM "${{ray_pids[@]}}" 2>/dev/null
    wait "${{ray_pids[@]}}" 2>/dev/null
    if [ "$ready" = 0 ]; then  # (srun ends its tasks without the signal ray_node waits for: their dirs go here)
        rm -rf "$RAY_DIRS".* "$RAY_LOGS".*.log
        if [ "${{#nodes[@]}}" -gt 1 ] && ! err=$(srun --overlap --nodes=$((${{#nodes[@]}} - 1)) \\
            --ntasks=$((${{#nodes[@]}} - 1)) --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --export=ALL \\
            --exclude="$SLURMD_NODENAME" bash -c 'rm -rf "$RAY_DIRS".*' 2>&1); then
            say "Ray's temp dirs on the other nodes ($RAY_DIRS.*) were not removed: $err"
        fi
    fi
}}

# ---- signals: USR1 before the time limit (from --signal), TERM when SLURM stops the whole job --------------
got="" waiting=1 driver=""
on_usr1() {{
    got=USR1 waiting=1
    say "the time limit is {job.grace} s away: stopping the {stage} (SIGTERM to the driver) to requeue the job"
    [ -n "$driver" ] && kill -TERM "$driver" 2>/dev/null
}}
on_term() {{  # every process of the job got it, the driver too: nothing to pass on
    [ -z "$got" ] && got=TERM
    waiting=1
    say "SLURM stops the job (preempted, requeued or cancelled): every process got SIGTERM, Ray's too; the \\
{stage} continues from its last saved state when the job runs again (after a cancel: sbatch it again)"
}}
trap on_usr1 USR1
trap on_term TERM

# ---- the study ---------------------------------------------------------------------------------------------
rc=143 ready=1 ran=0  # (a signal before the driver ran: the study is as the last allocation left it)
if [ -z "$got" ]; then
    "${{CHECK[@]}}" --address="$RAY_HEAD_IP:$RAY_PORT" --nodes="${{#nodes[@]}}" --allocation="$allocation" &
    driver=$!
    waiting=1
    while [ "$waiting" = 1 ]; do waiting=0; wait "$driver"; rc=$?; done  # a trap ends `wait`: wait again
    driver="" ready=$rc
fi
if [ -z "$got" ] && [ "$rc" = 0 ]; then
    if [ -f "$STUDY/study.json" ]; then args=("${{AGAIN[@]}}"); else args=("${{FIRST[@]}}"); fi
    say "fer-tune ${{args[*]}}"
    "${{FER_TUNE[@]}}" "${{args[@]}}" --address="$RAY_HEAD_IP:$RAY_PORT" &
    driver=$!
    printf '{{"job_id": "%s", "host": "%s", "pid": %s, "allocation": %s}}\\n' "$SLURM_JOB_ID" "$(hostname)" \\
        "$driver" "$allocation" >{shlex.quote(str(log_dir / DRIVER_MARK))}
    waiting=1
    while [ "$waiting" = 1 ]; do waiting=0; wait "$driver"; rc=$?; done
    ran=1
fi
[ "$ran" = 0 ] && [ "$ready" = 0 ] && rc=143
stop_ray

if [ "$ran" = 1 ] && [ "$rc" = 0 ]; then
    say "done: the {stage} is finished"
    exit 0
fi
if [ "$got" = USR1 ]; then
    if [ "$rc" = 143 ] || [ "$rc" = 130 ] || [ "$rc" = 129 ]; then
        if [ "$allocation" -lt "$MAX_REQUEUES" ]; then
            say "the {stage} is saved; requeueing job $SLURM_JOB_ID ($((allocation + 1)) of $MAX_REQUEUES)"
            trap '' TERM  # what the requeue sends this script
            scontrol requeue "$SLURM_JOB_ID" && exit 0
            say "scontrol requeue failed: continue with sbatch {log_dir / SCRIPT}"
        else
            say "the {stage} is saved; not requeued: MAX_REQUEUES ($MAX_REQUEUES) reached (continue with sbatch \\
{log_dir / SCRIPT})"
        fi
    fi
elif [ "$got" = TERM ]; then
    say "stopped by SLURM (exit $rc)"
else
    say "fer-tune ended with exit $rc; not requeued (see the lines above)"
    [ "$ready" != 0 ] && say "Ray's start-up logs: $RAY_LOGS.*.log"
fi
exit "$rc"
"""
