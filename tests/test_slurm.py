"""`fer-tune slurm`: the batch scripts it writes (a study, its final and PBT stages) and its refusals (no SLURM
needed), and jobs on a real 2-node SLURM cluster on this host (tests/slurmcluster.py): a study across both nodes
with Ray's token never written down; a study stopped by its real time limit (SLURM's USR1 before it: the script
requeues the job) and by `scontrol requeue` (SIGTERM to every process) that resumes and ends with exactly its
trials; a study cancelled (`scancel`: the chain ends) that `fer-tune resume` finishes by hand, and its final stage
as a job. The cluster tests are skipped where SLURM is not installed or the tests do not run as root, unless
FER_TUNE_REQUIRE_SLURM is set (CI)."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SPACE, fer_tune, pausing, processes, read_csv, study_trials

from fer_tune.tune.runtime.internals import PRESTART_ENV

TINY = {**SPACE, "num_samples": 4, "max_epochs": 2, "early_stopping": {"type": "none"}}


def slurm_cli(env, *args, cwd=None):
    """`fer-tune slurm ...` in this process (it starts no Ray)."""
    return fer_tune(env, "slurm", *args, cwd=cwd)


def one_line_error(r, *words):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fer-tune: error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def shared(tmp_path):
    """A directory for a study of a multi-node job: not under /tmp, which a cluster's nodes do not share (the
    command refuses it)."""
    base = Path.home() / ".cache"
    base.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="fer-tune-slurm-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def no_slurm(tmp_path):
    """An environment where SLURM's clients answer nothing (no cluster configured)."""
    return {**os.environ, "SLURM_CONF": str(tmp_path / "no-slurm.conf")}


def fake_tool(tmp_path, name: str, script: str) -> str:
    """A PATH with a fake SLURM client `name` (a shell script) first."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / name).write_text("#!/bin/sh\n" + script)
    (bindir / name).chmod(0o755)
    return f"{bindir}:{os.environ['PATH']}"


def sbatch_lines(text: str) -> list[str]:
    return [line[len("#SBATCH ") :] for line in text.splitlines() if line.startswith("#SBATCH ")]


# ---------------------------------------------------------------------------------------------------------
# the script (no SLURM needed)
# ---------------------------------------------------------------------------------------------------------
def test_script_of_a_new_study(shared, no_slurm):
    space = shared / "t.yaml"
    space.write_text(yaml.safe_dump(TINY, sort_keys=False))
    r = slurm_cli(
        no_slurm,
        space,
        "--results",
        shared / "results",
        "--num-samples",
        "5",
        "--data",
        "synthetic:1000",
        "--nodes",
        "2",
        "--cpus-per-node",
        "3",
        "--time",
        "0-02:00:00",
        "--partition",
        "gpu",
        "--account",
        "proj1",
        "--qos",
        "normal",
        "--setup",
        "module load cuda; source .venv/bin/activate",
        "--sbatch-option=--constraint=a100",
        "--grace",
        "120",
        "--max-requeues",
        "3",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    script = shared / "results" / "t" / "slurm.sbatch"
    assert f"wrote {script}" in r.stdout and f"sbatch {script}" in r.stdout
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # valid bash
    lines = sbatch_lines(text)
    for want in (
        "--job-name=fer-tune-t",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=3",
        "--time=0-02:00:00",
        "--partition=gpu",
        "--account=proj1",
        "--qos=normal",
        f"--output={shared}/results/t/slurm-%j.log",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@120",
        "--constraint=a100",
    ):
        assert want in lines, (want, lines)
    assert not any(line.startswith("--gres") for line in lines)  # a CPU study asks for no GPU
    assert "\nmodule load cuda; source .venv/bin/activate\n" in text
    assert "MAX_REQUEUES=3\n" in text and "FER_TUNE=(python -m fer_tune.cli)" in text
    assert (
        f"FIRST=(sweep {space} --name t --results {shared}/results --data synthetic:1000 --num-samples 5 --quiet)"
        in text
    )
    assert f"AGAIN=(resume {shared}/results/t --quiet)" in text
    assert 'if [ -f "$STUDY/study.json" ]' in text  # sweep the first time, resume after
    # Ray: this job's own port and short temp dirs, token authentication with a token made in the job
    assert "export RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN=$(od -An -N32 -tx1 /dev/urandom" in text
    assert "JOBID % 1000 * 40" in text and "RAY_DIRS=/tmp/rj${SLURM_JOB_ID}_$allocation" in text
    assert len("/tmp/rj4294967295_20.12/session_2026-12-06_14-29-33_648123_123456/sockets/plasma_store") < 107
    assert "ray stop" not in text.replace("`ray stop` would", "")
    # the time limit: USR1 to the script, SIGTERM to the driver, requeue while the study is unfinished
    assert "trap on_usr1 USR1" in text and 'kill -TERM "$driver"' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and '"$allocation" -lt "$MAX_REQUEUES"' in text
    assert not list((shared / "results" / "t").glob("*token*"))
    assert sorted(p.name for p in (shared / "results" / "t").iterdir()) == ["slurm.sbatch"]


def test_a_requeued_allocation_waits_for_its_earlier_driver_still_ending_on_the_node(tmp_path, monkeypatch):
    """SLURM may start a requeued job again on the same node before the earlier allocation's driver has ended
    (it holds the study's lock while it saves): the new allocation waits for it, then runs, instead of refusing
    with exit 2."""
    import socket

    from fer_tune.tune.runtime.lock import LOCK_FILE, acquire
    from fer_tune.tune.slurm.ready import release_stale_lock
    from fer_tune.tune.slurm.script import DRIVER_MARK

    study = tmp_path / "t"
    study.mkdir()

    def driver(seconds: float) -> subprocess.Popen:
        """A process that takes the study's lock, says so, and holds it `seconds`."""
        code = (
            "import sys, time; from fer_tune.tune.runtime.lock import acquire; "
            f"acquire(sys.argv[1], what='the study'); print('locked', flush=True); time.sleep({seconds})"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(study)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout.readline().strip() == "locked"
        return proc

    earlier = driver(1)
    try:
        mark = {"job_id": "4242", "allocation": 1, "host": socket.gethostname(), "pid": earlier.pid}
        (study / DRIVER_MARK).write_text(json.dumps(mark))
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        t0 = time.monotonic()
        release_stale_lock(study, 2)
        assert earlier.poll() is not None and time.monotonic() - t0 > 0.5  # it waited for the driver to end
        assert (study / LOCK_FILE).read_text() == ""
        acquire(study, what="the study").release()
        # a driver that does not end in time keeps its lock: the command then refuses, naming it
        hold = driver(30)
        try:
            (study / DRIVER_MARK).write_text(json.dumps({**mark, "pid": hold.pid}))
            release_stale_lock(study, 2, linger=0.5)
            assert json.loads((study / LOCK_FILE).read_text())["pid"] == hold.pid
        finally:
            hold.kill()
            hold.wait()
    finally:
        earlier.kill()
        earlier.wait()


def test_defaults_for_one_node(tmp_path, no_slurm):
    r = slurm_cli(no_slurm, "smoke", "--results", tmp_path / "results")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "results" / "smoke" / "slurm.sbatch").read_text()
    lines = sbatch_lines(text)
    assert "--nodes=1" in lines and "--time=1-00:00:00" in lines and "--signal=B:USR1@300" in lines
    assert "MAX_REQUEUES=20\n" in text
    assert f"FER_TUNE=({sys.executable} -m fer_tune.cli)" in text  # without --setup: this Python
    assert "warning" not in r.stdout
    r = slurm_cli(no_slurm, "smoke", "--results", tmp_path / "results", "--time", "3", "--grace", "30")
    assert r.returncode == 0 and "warning: an allocation may be stopped 90 s after it starts" in r.stdout, r


def test_gpu_study_asks_for_gpus(tmp_path, no_slurm):
    r = slurm_cli(no_slurm, "joint", "--results", tmp_path / "results", "--gpus-per-trial", "0.25")
    assert r.returncode == 0, r.stderr
    lines = sbatch_lines((tmp_path / "results" / "joint" / "slurm.sbatch").read_text())
    assert "--gres=gpu:1" in lines
    r = slurm_cli(no_slurm, "joint", "--results", tmp_path / "results", "--gpus-per-node", "0")
    one_line_error(r, "--gpus-per-node is 0", "--gpus-per-trial 0")


@pytest.mark.parametrize(
    "args,words",
    [
        (["--time", "2-25:00:00"], ["--time", "hours must be < 24"]),
        (["--time", "forever"], ["--time 'forever'", "D-HH:MM:SS"]),
        (["--time", "10", "--grace", "600"], ["--grace 600", "not shorter than --time"]),
        (["--nodes", "0"], ["--nodes must be >= 1"]),
        (["--sbatch-option", "constraint=a100"], ["--sbatch-option", "one sbatch option"]),
        (["--epochs", "3"], ["--epochs", "need --final"]),
        (["--final"], ["--final", "not a study directory"]),
        # what `fer-tune sweep` refuses is refused when the job is written, not after its wait in the queue
        (["--cpus-per-node", "0"], ["--cpus-per-node must be >= 1, got 0"]),
        (["--num-samples", "0"], ["num_samples=0: must be >= 1"]),
        (["--max-concurrent", "0"], ["--max-concurrent must be >= 1"]),
        (["--gpus-per-trial", "-1"], ["resources.gpu must be a number >= 0"]),
        (["--data", "/nonexistent/fer2013.csv"], ["data path /nonexistent/fer2013.csv does not exist"]),
        # a job in which no trial could start
        (["--cpus-per-trial", "4", "--cpus-per-node", "2"], ["each trial asks for 4 CPUs", "has 2", "could start"]),
        (["--gpus-per-trial", "3", "--gpus-per-node", "2"], ["each trial asks for 3 GPUs", "has 2", "could start"]),
    ],
)
def test_bad_input_is_one_line(tmp_path, no_slurm, args, words):
    one_line_error(slurm_cli(no_slurm, "smoke", "--results", tmp_path / "results", *args), *words)


def test_gpus_that_the_cpus_of_a_node_cannot_feed_are_said(tmp_path, no_slurm):
    # joint: 4 CPUs and a quarter GPU a trial; 17 CPUs run 4 trials at once, on 1 of the node's 4 GPUs
    args = ("joint", "--results", tmp_path / "results", "--gpus-per-trial", "0.25", "--gpus-per-node", "4")
    r = slurm_cli(no_slurm, *args, "--cpus-per-node", "17")
    assert r.returncode == 0, r.stderr
    want = "warning: a node's 17 CPUs run 4 trial(s) at once (4 CPUs each), which use 1 of its 4 GPUs; "
    assert want + "to use them all, a node needs 65 CPUs (--cpus-per-node), or the trials fewer CPUs each" in r.stdout
    r = slurm_cli(no_slurm, *args)  # the default feeds them all
    assert r.returncode == 0 and "warning" not in r.stdout and "x 65 CPUs, 4 GPU(s) each" in r.stdout, r.stdout


def test_the_other_nodes_ray_asks_for_the_nodes_cpus_again(tmp_path, no_slurm):
    """srun does not take sbatch's --cpus-per-task (SLURM 22.05 to 23.02): the step that starts Ray on the other
    nodes asks for the node's CPUs and its memory itself, or a cluster that binds tasks to cores gives that Ray one;
    and the environment that carries Ray's token, whatever --export the job was submitted with."""
    r = slurm_cli(no_slurm, "smoke", "--results", tmp_path / "results", "--cpus-per-node", "6")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "results" / "smoke" / "slurm.sbatch").read_text()
    step = text[text.index("    srun --overlap") : text.index("ray_node $((SLURM_NODEID + 1))")]
    assert '--cpus-per-task="$CPUS_PER_NODE" --mem=0 --export=ALL' in step and "export CPUS_PER_NODE=6 " in text
    # the step that removes their temp dirs: one task a node whatever the job's task count and CPUs per task
    cleanup = text[text.index("stop_ray() {") : text.index("# ---- signals")]
    assert "--ntasks=$((${#nodes[@]} - 1)) --ntasks-per-node=1 --cpus-per-task=1 --mem=0 --export=ALL" in cleanup


@pytest.mark.parametrize(
    "memory, store",
    [
        ({"SLURM_MEM_PER_NODE": "10000"}, "--object-store-memory=3145728000"),  # 30 % of 10,000 MiB
        ({"SLURM_MEM_PER_CPU": "2000"}, "--object-store-memory=3145728000"),  # x 5 CPUs a node
        ({"SLURM_MEM_PER_GPU": "8000"}, "--object-store-memory=5033164800"),  # x 2 GPUs a node
        ({}, ""),  # SLURM gives no figure: Ray's own default
    ],
)
def test_rays_object_store_is_sized_from_the_jobs_memory(tmp_path, no_slurm, memory, store):
    """Ray sizes its object store from the node's memory (30 %, at most 200 GB), which the job's memory limit on
    a shared node may not hold: the script gives it 30 % of the job's memory on a node where SLURM says it."""
    r = slurm_cli(no_slurm, "smoke", "--results", tmp_path / "r", "--cpus-per-node", "5", "--gpus-per-trial", "1",
                  "--gpus-per-node", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "r" / "smoke" / "slurm.sbatch").read_text()
    block = text[text.index("export CPUS_PER_NODE=") : text.index("\n", text.index('[ "${job_mb:-0}" -gt 0 ]'))]
    env = {"PATH": os.environ["PATH"], **memory}
    out = subprocess.run(
        ["bash", "-c", block + '\necho "[$RAY_OBJECT_STORE]"'], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip().splitlines()[-1] == f"[{store}]", (out.stdout, out.stderr)
    assert "$RAY_OBJECT_STORE $RAY_START_ARGS" in text  # before the user's own options, which win


def test_the_heads_port_is_the_jobs_or_the_next_free_one(tmp_path, no_slurm):
    """Ray's head port comes from the job id (20000 + JOBID % 1000 * 40); on a shared node another job (whose id
    is the same modulo 1000) or a connection may hold it: the script takes the next slot whose port and Ray
    Client's (the one after) are both free, rather than a `ray start` that fails and ends the chain."""
    import socket

    r = slurm_cli(no_slurm, "smoke", "--results", tmp_path / "r")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "r" / "smoke" / "slurm.sbatch").read_text()
    block = text[text.index("read -r RAY_HEAD_IP RAY_PORT") : text.index("export RAY_HEAD_IP RAY_PORT")]

    def port_for(job: int) -> int:
        env = {**os.environ, "SLURM_JOB_ID": str(job)}
        out = subprocess.run(["bash", "-c", block + 'echo "$RAY_PORT"'], env=env, capture_output=True, text=True)
        return int(out.stdout.strip().splitlines()[-1])

    job = 7_000_000 + int(time.time()) % 1000  # a slot no other test takes at once
    own = 20000 + job % 1000 * 40
    assert port_for(job) == own
    with socket.socket() as head, socket.socket() as client:
        head.bind(("", own))  # another job's head on this node
        client.bind(("", 20000 + (job + 1) % 1000 * 40 + 1))  # and, in the next slot, something on its client port
        assert port_for(job) == 20000 + (job + 2) % 1000 * 40


def test_node_local_study_refused_for_several_nodes(tmp_path, no_slurm):
    r = slurm_cli(no_slurm, "smoke", "--results", tmp_path / "results", "--nodes", "2")
    one_line_error(r, "the study directory", "under /tmp", "--nodes 1")
    if Path("/dev/shm").is_dir():
        r = slurm_cli(no_slurm, "smoke", "--results", "/dev/shm/fer-tune-results", "--nodes", "2")
        one_line_error(r, "tmpfs (memory) filesystem")
    assert not (tmp_path / "results").exists() and not Path("/dev/shm/fer-tune-results").exists()
    r = slurm_cli(no_slurm, "smoke", "--results", tmp_path / "results", "--nodes", "1")  # one node: fine
    assert r.returncode == 0, r.stderr


def test_submit_needs_sbatch_and_relays_its_refusal(tmp_path, no_slurm):
    path = ":".join(d for d in os.environ["PATH"].split(":") if not (Path(d) / "sbatch").exists())
    r = slurm_cli({**no_slurm, "PATH": path}, "smoke", "--results", tmp_path / "results", "--submit")
    one_line_error(r, "sbatch is not on PATH", f"sbatch {tmp_path}/results/smoke/slurm.sbatch")
    assert (tmp_path / "results" / "smoke" / "slurm.sbatch").is_file()  # written all the same

    refusal = "echo 'sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified' >&2; exit 1\n"
    env = {**no_slurm, "PATH": fake_tool(tmp_path, "sbatch", refusal)}
    r = slurm_cli(env, "smoke", "--results", tmp_path / "results", "--account", "nope", "--submit")
    one_line_error(r, "sbatch refused the job: Batch job submission failed: Invalid account")

    env["PATH"] = fake_tool(tmp_path, "sbatch", 'echo "4242;cluster"\n')
    r = slurm_cli(env, "smoke", "--results", tmp_path / "results", "--submit")
    assert r.returncode == 0, r.stderr
    assert "submitted job 4242" in r.stdout and "squeue -j 4242" in r.stdout
    assert f"{tmp_path}/results/smoke/slurm-4242.log" in r.stdout and "fer-tune status" in r.stdout


def test_the_state_of_a_studys_job_as_squeue_says_it(tmp_path, monkeypatch):
    from fer_tune.tune.slurm.job import study_job, study_job_line

    (tmp_path / "slurm.conf").write_text("")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    record = {"runs": [{"sessions": [{"slurm": {"job_id": "77"}}, {"kind": "resume"}]}]}
    monkeypatch.setenv("PATH", fake_tool(tmp_path, "squeue", 'test "$3" = 77 && echo "PENDING|BeginTime"\n'))
    assert study_job(record) == {"job_id": "77", "state": "PENDING", "reason": "BeginTime"}
    assert study_job_line(record) == "SLURM job 77 (the study's last session): PENDING (BeginTime)"
    monkeypatch.setenv("PATH", fake_tool(tmp_path, "squeue", "exit 0\n"))  # squeue no longer knows the job
    assert study_job(record) is None and study_job_line(record) is None
    assert study_job({"runs": [{"sessions": [{"kind": "sweep"}]}]}) is None  # not run by SLURM


def test_partition_checked_with_sinfo(tmp_path, shared):
    # two partitions as `sinfo -h -N -o %P|%N|%c|%G` lists them: cpu (default, no GPUs) and gpu (4 A100s per node)
    nodes = r"printf 'cpu*|c1|64|(null)\ncpu*|c2|64|(null)\ngpu|g1|32|gpu:a100:4(S:0-1)\n'" + "\n"
    (tmp_path / "slurm.conf").write_text("")
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "slurm.conf"), "PATH": fake_tool(tmp_path, "sinfo", nodes)}
    res = shared / "results"
    one_line_error(slurm_cli(env, "smoke", "--results", res, "--partition", "big"), "no partition 'big'", "cpu, gpu")
    one_line_error(
        slurm_cli(env, "smoke", "--results", res, "--partition", "gpu", "--gpus-per-node", "8"),
        "--gpus-per-node 8",
        "partition gpu have at most 4 GPU(s)",
    )
    one_line_error(
        slurm_cli(env, "smoke", "--results", res, "--gpus-per-node", "1"), "partition cpu have at most 0 GPU(s)"
    )
    one_line_error(slurm_cli(env, "smoke", "--results", res, "--partition", "gpu", "--nodes", "2"), "has 1 node(s)")
    r = slurm_cli(env, "smoke", "--results", res, "--partition", "gpu", "--gpus-per-node", "4", "--gpus-per-trial", "1")
    assert r.returncode == 0, r.stderr
    lines = sbatch_lines((res / "smoke" / "slurm.sbatch").read_text())
    assert "--gres=gpu:4" in lines and "--cpus-per-task=5" in lines  # 4 trials of 1 CPU, and the driver


def test_scripts_of_an_existing_study_and_its_final_stage(small_study, no_slurm, tmp_path):
    sdir = small_study
    r = slurm_cli(no_slurm, sdir, "--time", "12:00:00")
    assert r.returncode == 0, r.stderr
    text = (sdir / "slurm.sbatch").read_text()
    assert f"FIRST=(resume {sdir})" in text and f"AGAIN=(resume {sdir})" in text
    one_line_error(slurm_cli(no_slurm, sdir, "--num-samples", "9"), "--num-samples", "already holds a study")

    (sdir / "slurm.sbatch").unlink()  # the study stays as the other modules' tests expect it

    out = tmp_path / "final"  # (by default STUDY/final)
    r = slurm_cli(no_slurm, sdir, "--final", "--epochs", "3", "--seeds", "2", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    text = (out / "slurm.sbatch").read_text()
    assert f"FIRST=(final {sdir} --epochs 3 --seeds 2 --out {out} --quiet)" in text
    assert f"--output={out}/slurm-%j.log" in sbatch_lines(text) and f"--lock-dir {out}" in text
    assert "--job-name=fer-tune-t-final" in sbatch_lines(text)
    one_line_error(slurm_cli(no_slurm, sdir, "--final", "--data", "x.csv"), "--data", "final stage")
    # sized for the runs' CPUs; the final stage's own refusals said when the job is written
    r = slurm_cli(no_slurm, sdir, "--final", "--seeds", "3", "--cpus-per-run", "4", "--out", out)
    assert r.returncode == 0 and "x 17 CPUs" in r.stdout, r.stdout  # 4 runs of 4 CPUs, and the driver
    one_line_error(slurm_cli(no_slurm, sdir, "--final", "--epochs", "0", "--out", out), "--epochs must be > 0")
    one_line_error(slurm_cli(no_slurm, sdir, "--final", "--cpus-per-run", "0", "--out", out), "--cpus-per-run must")
    one_line_error(
        slurm_cli(no_slurm, sdir, "--final", "--cpus-per-run", "8", "--cpus-per-node", "4", "--out", out),
        "each run asks for 8 CPUs",
    )


def test_a_warm_start_and_an_ensemble_reach_the_job(small_study, no_slurm, tmp_path):
    space = tmp_path / "t.yaml"
    space.write_text(yaml.safe_dump(TINY, sort_keys=False))
    donor = small_study.relative_to(small_study.parent.parent)  # results/t, as typed beside results/
    args = ("--results", tmp_path / "results", "--name", "warm", "--quiet")
    r = slurm_cli(
        no_slurm, space, *args, "--warm-start", f"{donor}:2", "--warm-start", donor, cwd=small_study.parents[1]
    )
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "results" / "warm" / "slurm.sbatch").read_text()
    assert (
        f"--warm-start {small_study}:2 --warm-start {small_study} --quiet)" in text
    )  # absolute: the job runs elsewhere
    one_line_error(
        slurm_cli(no_slurm, space, *args, "--warm-start", tmp_path / "nowhere"), "--warm-start", "nowhere"
    )  # said now, not hours later in the job

    out = tmp_path / "final"
    r = slurm_cli(no_slurm, small_study, "--final", "--ensemble", "3", "--seeds", "2", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (
        f"FIRST=(final {small_study} --seeds 2 --ensemble 3 --out {out} --quiet)" in (out / "slurm.sbatch").read_text()
    )


def fake_study(root: Path) -> Path:
    """A study directory as far as `fer-tune slurm --pbt / --final` reads it (study.json's spec), without a sweep."""
    sdir = root / "results" / "t"
    sdir.mkdir(parents=True)
    spec = {"resources": {"cpu": 1, "gpu": 0}, "max_epochs": 2}
    (sdir / "study.json").write_text(json.dumps({"name": "t", "spec": spec, "runs": []}))
    return sdir


def test_script_of_the_pbt_stage(shared, no_slurm):
    sdir = fake_study(shared)
    pbt = ["--top-k", "2", "--population", "4", "--epochs", "3", "--interval", "1", "--mutate", "lr,dropout"]
    r = slurm_cli(no_slurm, sdir, "--pbt", *pbt, "--method", "pbt", "--nodes", "2", "--time", "12:00:00",
                  "--grace", "120", "--max-requeues", "5", "--force", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    script = sdir / "pbt" / "slurm.sbatch"  # beside the stage, as the final stage's is
    assert f"wrote {script}" in r.stdout and f"sbatch {script}" in r.stdout
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    lines = sbatch_lines(text)
    for want in ("--job-name=fer-tune-t-pbt", "--nodes=2", "--time=12:00:00", f"--output={sdir}/pbt/slurm-%j.log",
                 "--requeue", "--signal=B:USR1@120",
                 "--cpus-per-task=3"):  # the population of 4 at once on 2 nodes: 2 members and the driver # fmt: skip
        assert want in lines, (want, lines)
    driver = f"pbt {sdir} {' '.join(pbt)} --method pbt --force --quiet"
    assert f"FIRST=({driver})" in text and f"AGAIN=({driver})" in text  # `fer-tune pbt` continues itself
    assert f"--study {sdir} --lock-dir {sdir}/pbt" in text  # the stage's lock, released after a killed driver
    assert "MAX_REQUEUES=5\n" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "the PBT stage is saved; requeueing job" in text and "done: the PBT stage is finished" in text
    assert "which continues the PBT stage where the last allocation left it" in text
    assert sorted(p.name for p in sdir.rglob("*")) == ["pbt", "slurm.sbatch", "study.json"]  # nothing run yet

    r = slurm_cli(no_slurm, sdir, "--pbt")  # every setting the driver's default
    assert r.returncode == 0, r.stderr
    assert f"FIRST=(pbt {sdir})" in script.read_text()
    # a GPU study's population of 6 at half a GPU each on one node: 3 GPUs, 6 CPUs and 1 for the driver
    record = json.loads((sdir / "study.json").read_text())
    record["spec"]["resources"] = {"cpu": 1, "gpu": 0.5}
    (sdir / "study.json").write_text(json.dumps(record))
    r = slurm_cli(no_slurm, sdir, "--pbt", "--top-k", "3", "--population", "6")
    assert r.returncode == 0, r.stderr
    lines = sbatch_lines(script.read_text())
    assert "--gres=gpu:3" in lines and "--cpus-per-task=7" in lines and "--nodes=1" in lines, lines
    # the final stage that replays the PBT stage's best member goes where `fer-tune final --from-pbt` writes
    r = slurm_cli(no_slurm, sdir, "--final", "--from-pbt")
    assert r.returncode == 0, r.stderr
    assert f"FIRST=(final {sdir} --from-pbt)" in (sdir / "final-pbt" / "slurm.sbatch").read_text()


@pytest.mark.parametrize(
    "args,words",
    [
        (["--pbt", "--final"], ["--final and --pbt", "one stage per job"]),
        (["--pbt", "--seeds", "2"], ["--seeds", "need --final"]),
        (["--top-k", "2"], ["--top-k", "need --pbt"]),
        (["--final", "--population", "4"], ["--population", "need --pbt"]),
        (["--pbt", "--num-samples", "3"], ["--num-samples", "do not apply to the PBT stage"]),
        (["--pbt", "--population", "1"], ["--population must be >= 2"]),
        (["--pbt", "--top-k", "3", "--population", "2"], ["--population 2 is smaller than --top-k 3"]),
        (["--pbt", "--interval", "5"], ["--interval 5 is longer than --epochs 2"]),
        (["--pbt", "--mutate", "momentum"], ["--mutate momentum", "lr, weight_decay, dropout"]),
        (["--pbt", "--mlflow", "mlruns"], ["--mlflow", "does not log to MLflow"]),
    ],
)
def test_bad_pbt_input_is_one_line(shared, no_slurm, args, words):
    sdir = fake_study(shared)
    one_line_error(slurm_cli(no_slurm, sdir, *args), *words)
    assert not (sdir / "pbt").exists()


def test_pbt_stage_needs_a_study(tmp_path, no_slurm):
    one_line_error(slurm_cli(no_slurm, "smoke", "--pbt", "--results", tmp_path), "--pbt", "not a study directory")


# ---------------------------------------------------------------------------------------------------------
# a real SLURM cluster: 2 nodes on this host
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from slurmcluster import SlurmCluster, available

    why = available()
    if why:
        if os.environ.get("FER_TUNE_REQUIRE_SLURM"):
            pytest.fail(f"{why} (.ci/run installs Debian's slurm-wlm and munge)")
        pytest.skip(why)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture
def job_env(slurm, shared, tmp_path):
    """The environment of a test's jobs. At the test's end every job still queued or running is cancelled, before
    the study directory (`shared`, set up first, removed last) goes: a failed test leaves none writing to it."""
    env = {
        **slurm.env,
        "PYTHONPATH": str(ROOT),  # the job's Python finds this checkout
        "PYTHONUNBUFFERED": "1",
        "FER_TUNE_CACHE": str(tmp_path / "cache"),
        "RAY_START_ARGS": "--object-store-memory=150000000",
        "TUNE_GLOBAL_CHECKPOINT_S": "1",
    }
    env.pop("RAY_TMPDIR", None)
    yield env
    slurm.cancel_all()


def submit(job_env, shared, space: dict, *args) -> tuple[str, Path]:
    (shared / "t.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    r = subprocess.run(
        [sys.executable, "-m", "fer_tune.cli", "slurm", "t.yaml", "--results", "results", "--nodes", "2",
         "--cpus-per-node", "1", "--time", "10:00", "--grace", "60", *args, "--submit"],
        env=job_env, cwd=shared, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = re.search(r"submitted job (\d+)", r.stdout).group(1)
    return job, shared / "results" / "t"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s")


def log_of(sdir: Path, job: str) -> str:
    f = sdir / f"slurm-{job}.log"
    return f.read_text() if f.exists() else ""


def token_of(job: str) -> str | None:
    """RAY_AUTH_TOKEN of the job's processes (this host runs them): read from /proc while it runs."""
    for _, _, env in processes():
        if env.get("SLURM_JOB_ID") == job and env.get("RAY_AUTH_TOKEN"):
            return env["RAY_AUTH_TOKEN"]
    return None


def finished(slurm, job: str, sdir: Path, timeout: float) -> dict:
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout)
    # a string, not a tuple: pytest cuts a tuple's repr short, and the job's log is what explains a failure
    assert info["JobState"] == "COMPLETED", f"{info}\n{log_of(sdir, job)}"
    return info


def sessions(sdir: Path) -> list[dict]:
    return [s for run in json.loads((sdir / "study.json").read_text())["runs"] for s in run["sessions"]]


@pytest.mark.slow
def test_time_limit_and_requeue_resume_the_study(slurm, job_env, shared):
    space = {**TINY, "num_samples": 6}
    # a real time limit: SLURM sends USR1 to the batch script GRACE s before it (--signal=B:USR1@GRACE; SLURM
    # counts the limit in minutes and may signal up to a minute early: here 45-105 s into the allocation); the
    # first driver waits after 2 results (the pause hook) so that the study cannot end before the limit
    env = pausing(job_env, shared / "paused", results=2)
    job, sdir = submit(env, shared, space, "--time", "0-00:03:00", "--grace", "75")
    token = wait_for(lambda: token_of(job), 60, "the job's Ray token")
    wait_for(lambda: " started: " in log_of(sdir, job), 120, "the study's first trial")
    # Ray on both nodes without the idle workers it would start for the first driver (one per CPU of a node)
    raylets = [env for _, cmd, env in processes() if env.get("SLURM_JOB_ID") == job and "/raylet " in cmd]
    assert [env.get(PRESTART_ENV) for env in raylets] == ["0", "0"]
    r = fer_tune(job_env, "status", sdir)
    assert r.returncode == 0 and f"SLURM job {job} (the study's last session): RUNNING on n[1-2]" in r.stdout, r
    st = json.loads(fer_tune(job_env, "status", sdir, "--json").stdout)
    assert st["slurm_job"] == {"job_id": job, "state": "RUNNING", "nodes": "n[1-2]"}, st["slurm_job"]
    wait_for(lambda: "allocation 2 " in log_of(sdir, job), 240, "the requeued allocation")
    # the rest of the chain with room to finish (an operator may lengthen a job's limit; root here)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=10:00")
    log = log_of(sdir, job)
    assert "the time limit is 75 s away" in log, log
    assert "SIGTERM received: stopping the trials and saving the study" in log
    assert f"requeueing job {job} (1 of 20)" in log
    # a preemption or `scontrol requeue`: SIGTERM to every process of the job at once, Ray's too
    wait_for(lambda: " epoch " in log_of(sdir, job).split("fer-tune resume")[-1], 120, "training again")
    slurm.run("scontrol", "requeue", job)
    finished(slurm, job, sdir, 300)
    log = log_of(sdir, job)
    assert "allocation 3 " in log and "done: the study is finished" in log, log

    trials = study_trials(sdir)
    assert len(trials) == 6 and {t.state.name for t in trials} == {"COMPLETE"}
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # no duplicates
    rows = read_csv(sdir)
    assert len(rows) == 6 and {r["status"] for r in rows} == {"completed"}
    ss = sessions(sdir)
    assert len(ss) >= 3 and all(s["slurm"]["job_id"] == job for s in ss)
    assert [s["slurm"]["restarts"] for s in ss] == list(range(len(ss)))
    assert ss[0]["outcome"] == "interrupted" and ss[-1]["outcome"] == "finished"
    assert all(s["slurm"]["nodes"] == "n[1-2]" for s in ss)
    assert "Ray is up on 2 node(s)" in log and f"every node sees {sdir}" in log
    node_ids = {json.loads(line)["node_id"] for f in (sdir / "tune").glob("*/result.json") for line in f.open()}
    assert len(node_ids) >= 2  # trials ran on both Ray nodes (one host: one IP, two node ids an allocation)
    # the token never reached a file: not the study, not the log, not Tune's pickles
    assert len(token) == 64
    for f in [*sdir.rglob("*"), shared / "t.yaml"]:
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f
    assert not list(Path("/tmp").glob(f"rj{job}_*"))  # Ray's temp dirs removed, every allocation's
    # and the last allocation's start-up logs, every node having joined (an allocation that `scontrol requeue`
    # ended keeps its own when SIGTERM came before the script removed them)
    assert not list(sdir.glob(f"ray-{job}_{ss[-1]['slurm']['restarts']}.*")), list(sdir.glob("ray-*"))


def job_processes(job: str) -> list[int]:
    """PIDs of this host's processes that belong to the SLURM job (its environment names it)."""
    return [pid for pid, _, env in processes() if env.get("SLURM_JOB_ID") == job]


@pytest.mark.slow
def test_scancel_ends_the_chain_then_resume_and_final_stage(slurm, job_env, shared):
    job, sdir = submit(job_env, shared, TINY)
    wait_for(lambda: re.search(r"trial \d epoch 1/2", log_of(sdir, job)), 120, "a trial's first epoch")
    slurm.run("scancel", job)  # SIGTERM to every process of the job: the chain ends, nothing is requeued
    info = slurm.wait(job, ("CANCELLED", "COMPLETED", "FAILED", "PENDING", "REQUEUED"), 60)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    wait_for(lambda: not job_processes(job), 60, "the end of the job's processes (Ray's included)")
    assert slurm.job(job)["JobState"] == "CANCELLED"
    log = log_of(sdir, job)
    assert "SLURM stops the job" in log and "allocation 2 " not in log and "requeueing" not in log, log
    # Ray's temp dirs: the other node's Ray, stopped by SLURM, removed its own; the head's went once the driver
    # ended, when SLURM let the script live that long (KillWait)
    left = {p.name for p in Path("/tmp").glob(f"rj{job}_*")}
    assert left <= ({f"rj{job}_0.0"} if "stopped by SLURM" not in log else set()), (left, log)
    for leftover in left:
        shutil.rmtree(Path("/tmp") / leftover, ignore_errors=True)

    last = sessions(sdir)[-1]  # the driver was killed with Ray: its session ended interrupted or not at all
    assert last["slurm"]["job_id"] == job and last.get("outcome", "interrupted") == "interrupted", last
    r = fer_tune(job_env, "status", sdir)
    assert r.returncode == 0 and "interrupted" in r.stdout, (r.stdout, r.stderr)

    r = fer_tune(job_env, "resume", sdir, "--quiet")  # by hand, outside SLURM (a local Ray of 2 CPUs)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = study_trials(sdir)
    assert len(trials) == 4 and {t.state.name for t in trials} == {"COMPLETE"}
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # no duplicates
    rows = read_csv(sdir)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    last = sessions(sdir)[-1]
    assert "slurm" not in last and last["outcome"] == "finished", last

    # the final stage of the finished study, as a job of its own
    r = subprocess.run(
        [sys.executable, "-m", "fer_tune.cli", "slurm", sdir, "--final", "--epochs", "1", "--finetune-epochs", "1",
         "--eval-every", "1", "--quiet", "--cpus-per-node", "1", "--time", "10:00", "--grace", "60", "--submit"],
        env=job_env, cwd=shared, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    final_job = re.search(r"submitted job (\d+)", r.stdout).group(1)
    out = sdir / "final"
    finished(slurm, final_job, out, 240)
    assert "done: the final stage is finished" in log_of(out, final_job)
    assert json.loads((out / "metrics.json").read_text())["status"] == "complete"
