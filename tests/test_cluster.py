"""GPU-cluster support: cluster.yaml (Ray's own validator + security points), Ray storage (a shared path, s3://
on a local moto server) with the refusal of a node-local path on a multi-node cluster, and `fer-tune preflight`,
all through the CLI against a real multi-node `ray.cluster_utils.Cluster` (head + 2 workers with fake GPUs)."""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import SPACE, epochs_reported, fer_tune, read_csv, study_trials, write_space

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_samples": 3, "max_epochs": 2, "early_stopping": {"type": "none"}}


def cli(env, *args, timeout=240):
    """fer-tune on the test's Ray cluster (--address): no local Ray, no --num-cpus."""
    return fer_tune(env, *args, timeout=timeout, num_cpus=None)


@pytest.fixture(scope="module")
def ray_env():
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {"RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray_env):
    """A head (1 CPU, no GPU) and two workers (1 CPU, 1 fake GPU each), sharing this machine's filesystem."""
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": 200 * 2**20},
    )
    try:
        workers = [c.add_node(num_cpus=1, num_gpus=1, object_store_memory=200 * 2**20) for _ in range(2)]
        c.wait_for_nodes()
        yield c, [w.node_id for w in workers]
    finally:
        c.shutdown()


@pytest.fixture
def env(ray_env, tmp_path):
    return {**os.environ, **ray_env, "FER_TUNE_CACHE": str(tmp_path / "cache")}


# ---------------------------------------------------------------------------------------------------------
# cluster.yaml
# ---------------------------------------------------------------------------------------------------------
def test_cluster_yaml_validates_and_opens_only_ssh():
    import ray
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (ROOT / "cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)  # Ray's own schema and checks
    commands = [c for k in ("setup_commands", "head_setup_commands", "worker_setup_commands") for c in prepared[k]]
    assert not any("ray-wheels" in c or "dev0" in c for c in commands)  # Ray's default: a nightly wheel

    types = cfg["available_node_types"]
    head, workers = types[cfg["head_node_type"]], [t for k, t in types.items() if k != cfg["head_node_type"]]
    assert cfg["provider"]["type"] == "aws" and "GPU" not in head.get("resources", {})
    gpu = [t for t in workers if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and all(t["min_workers"] == 0 < t["max_workers"] for t in gpu)
    assert all(t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"] for t in workers)  # not checked by Ray

    # what Ray opens for this config: its defaults + our rules; anything reachable from an IP range is SSH only
    rules = _create_default_inbound_rules({"sg-cluster"}, cfg["provider"]["security_group"]["IpPermissions"])
    public = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges") or r.get("PrefixListIds")]
    assert public and all((r["IpProtocol"], r["FromPort"], r["ToPort"]) == ("tcp", 22, 22) for r in public)
    assert all(g["GroupId"] == "sg-cluster" for r in rules if r not in public for g in r["UserIdGroupPairs"])

    # the dashboard on localhost only, never on all interfaces
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in text
    # no credentials
    live = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret|secret_access|password|BEGIN .*PRIVATE KEY", live, re.I)
    assert "ssh_private_key" not in cfg["auth"] and all("KeyName" not in t["node_config"] for t in types.values())

    # Ray pinned to this machine's version (launcher and cluster must match); fer-tune from the synced project
    setup = cfg["setup_commands"]
    pins = {m for c in setup for m in re.findall(r"ray\[[a-z,]+\]==([0-9.]+)", c)}
    assert pins == {ray.__version__}
    assert cfg["file_mounts"] == {"~/fer-tune": "."} and any("pip install" in c and "-e ~/fer-tune" in c for c in setup)
    assert any("FER2013_URI" in c for c in setup)  # the dataset from the user's bucket, by an env var


def test_fetch_step_copies_the_dataset_once(tmp_path):
    """The setup step that fetches FER2013 (here from a local path instead of s3://), run as a node runs it."""
    step = next(c for c in yaml.safe_load((ROOT / "cluster.yaml").read_text())["setup_commands"] if "FER2013_URI" in c)
    src = tmp_path / "fer2013.csv"
    src.write_text("emotion,pixels,Usage\n")
    (tmp_path / "fer-tune").mkdir()
    (tmp_path / "fer-tune" / "cluster.env").write_text(f"FER2013_URI={src}\n")
    env = {**os.environ, "HOME": str(tmp_path)}
    for _ in range(2):
        r = subprocess.run(["bash", "-c", step], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "fer2013.csv").read_text() == src.read_text()
    (tmp_path / "fer-tune" / "cluster.env").unlink()
    r = subprocess.run(["bash", "-c", step], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "FER2013_URI is not set" in r.stdout


# ---------------------------------------------------------------------------------------------------------
# storage: the flags and the multi-node rule
# ---------------------------------------------------------------------------------------------------------
def test_node_local_path_on_a_multi_node_cluster_is_detected(tmp_path):
    from fer_tune.tune.runtime.storage import filesystem_type, node_local_problem

    local = str(tmp_path / "results")
    msg = node_local_problem(local, 3)
    assert msg and "3 alive nodes" in msg and local in msg and "--storage s3://" in msg
    assert filesystem_type(tmp_path) in msg  # says what it found (ext4, overlay, ...)
    assert node_local_problem(local, 1) is None  # one machine: any path will do
    assert node_local_problem("s3://bucket/prefix", 3) is None
    assert node_local_problem(local, 3, fstype="nfs4") is None  # a shared mount
    assert node_local_problem(local, 3, unseen=0) is None  # every other node saw the probe file
    assert "2 of the other nodes did not see" in node_local_problem(local, 3, unseen=2)
    grows = node_local_problem(local, 1, grows=True)  # head only; trials wait for autoscaled nodes
    assert grows and "autoscaler" in grows


def test_storage_flags_are_checked(tmp_path, capsys):
    from fer_tune.cli import main

    space = write_space(tmp_path)
    base = ["sweep", str(space), "--results", str(tmp_path / "r"), "--num-cpus", "1"]
    assert main(base + ["--optuna-storage", str(tmp_path / "db")]) == 2
    assert "SQLAlchemy URL" in capsys.readouterr().err
    assert main(base + ["--optuna-storage", "postgresql://u:secret@host/db"]) == 2
    assert "env:VARNAME" in capsys.readouterr().err
    assert main(base + ["--storage", "s3://KEY:SECRET@bucket/p"]) == 2
    err = capsys.readouterr().err
    assert "credentials" in err and "SECRET" not in err
    assert not (tmp_path / "r").exists()  # refused before any file was written


# ---------------------------------------------------------------------------------------------------------
# against a multi-node cluster
# ---------------------------------------------------------------------------------------------------------
def test_preflight_passes_on_every_node(cluster, env, tmp_path):
    c, workers = cluster
    r = cli(env, "preflight", "--address", c.address, "--storage", tmp_path / "shared", "--data", "synthetic", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["ok"] and not rep["failures"] and len(rep["nodes"]) == 3 and rep["gpus"] == 2
    for row in rep["nodes"]:
        assert row["storage"].pop("free") > 0  # the mount's free space, seen from the node
        assert row["versions"] == rep["driver"] and row["storage"] == {
            "sees_driver_file": True,
            "write": True,
            "error": "",
        }
    assert {row["node_id"] for row in rep["nodes"] if row["ray_gpus"] == 1} == set(workers)
    # fake GPUs: Ray offers them, torch (no NVIDIA driver here) sees none: a warning, not a failure
    assert sum("no NVIDIA driver" in w for w in rep["warnings"]) == 2
    assert not [p for p in (tmp_path / "shared").iterdir()]  # the probe files are gone


def test_preflight_fails_for_an_unwritable_storage(cluster, env, tmp_path):
    c, _ = cluster
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = cli(env, "preflight", "--address", c.address, "--storage", blocker / "sub", "--data", tmp_path / "no.csv")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "preflight failed on 3 of 3 node(s); failed checks: data, storage" in r.stderr
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL: ")]
    assert sum("storage: cannot write" in f and "Not a directory" in f for f in fails) == 4  # driver + 3 nodes
    assert sum("data: data path" in f and "does not exist" in f for f in fails) == 3
    assert re.search(r"\(head\)\s.*FAIL\s+FAIL", r.stdout)  # the table row: versions ok, storage FAIL, ...


def test_sweep_on_the_cluster_keeps_experiments_in_the_ray_storage(cluster, env, tmp_path, capsys):
    c, workers = cluster
    space = write_space(tmp_path, **TINY, resources={"cpu": 1, "gpu": 0.5})  # trials fit on the GPU workers only
    results, shared = tmp_path / "results", tmp_path / "shared"
    r = cli(
        env,
        "sweep",
        space,
        "--results",
        results,
        "--address",
        c.address,
        "--storage",
        shared,
        "--quiet",
        "--max-concurrent",
        "2",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    sdir = results / "t"
    record = json.loads((sdir / "study.json").read_text())
    assert (
        record["ray_storage"] == str(shared / "t") and record["storage"] == "sqlite:///optuna.db"
    )  # its own, beside it
    assert (shared / "t" / "tune" / "tuner.pkl").exists() and not (sdir / "tune").exists()
    assert len(study_trials(sdir)) == 3 and all(t.state.name == "COMPLETE" for t in study_trials(sdir))
    rows = read_csv(sdir)
    assert len(rows) == 3 and all(row["epochs"] == "2" and float(row["device_seconds"]) > 0 for row in rows)
    ran_on = {
        json.loads(line)["node_id"]
        for f in (shared / "t" / "tune").glob("*/result.json")
        for line in f.read_text().splitlines()
        if line.strip()
    }
    assert ran_on == {w[:12] for w in workers}  # two at a time: one on each GPU worker, none on the head
    from fer_tune.cli import main

    capsys.readouterr()
    assert main(["status", str(sdir), "--json"]) == 0  # reads the trials' results from the Ray storage
    assert json.loads(capsys.readouterr().out)["finished"] == 3
    assert main(["resume", str(sdir)]) == 0  # reads Tune's experiment state from there
    assert "nothing to resume" in capsys.readouterr().err  # what happened: stderr


def test_node_local_storage_is_refused_when_trials_need_other_nodes(ray_env, env, tmp_path):
    """A head-only cluster whose trials need a GPU it lacks (an autoscaling GPU pool at launch): the default Ray
    storage (RESULTS/NAME on the head's own disk) is refused before any file is written."""
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": 100 * 2**20},
    )
    try:
        space = write_space(tmp_path, **TINY, resources={"cpu": 1, "gpu": 1})
        r = cli(env, "sweep", space, "--results", tmp_path / "results", "--address", c.address, "--quiet")
    finally:
        c.shutdown()
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert err.startswith("fer-tune: error: the Ray cluster has one alive node and none has the resources")
    assert "is a path on this machine's own disk" in err and "--storage s3://BUCKET/PREFIX" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "results" / "t").exists()


# ---------------------------------------------------------------------------------------------------------
# s3:// storage on a local S3 server: a study writes there, is interrupted, and resumes from there
# ---------------------------------------------------------------------------------------------------------
def test_s3_storage_sweep_interrupted_then_resumed(ray_env, env, tmp_path, monkeypatch):
    pytest.importorskip("moto.server", reason="pip install 'moto[server]' (the test extra) for the S3 test")
    import boto3
    from moto.server import ThreadedMotoServer

    from fer_tune.tune.runtime import storage as st

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        for k, v in s3.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket="fer")
        env = {**env, **s3}
        space = write_space(
            tmp_path,
            num_samples=2,
            max_epochs=6,
            data={**SPACE["data"], "path": "synthetic:2000"},
            early_stopping={"type": "none"},
        )
        sdir, exp = tmp_path / "results" / "t", "s3://fer/studies/t/tune"
        cmd = [
            sys.executable,
            "-m",
            "fer_tune.cli",
            "sweep",
            str(space),
            "--results",
            str(tmp_path / "results"),
            "--storage",
            "s3://fer/studies",
            "--num-cpus",
            "2",
            "--quiet",
        ]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            deadline = time.time() + 150

            def states() -> dict:  # Tune's experiment state in S3: {key: ETag}
                listed = boto3.client("s3").list_objects_v2(Bucket="fer", Prefix="studies/t/tune/experiment_state")
                return {o["Key"]: o["ETag"] for o in listed.get("Contents", [])}

            # Ctrl-C once the driver has a trial's first epoch and Tune has saved its state to S3 after that (the
            # state then names the epoch's checkpoint), with 5 more epochs to go; not once S3 holds a result.json,
            # which Tune syncs later (on a fast machine after both trials had finished)
            while time.time() < deadline and not epochs_reported(sdir):
                assert proc.poll() is None, "the sweep ended before it could be interrupted"
                time.sleep(0.1)
            before = states()
            while time.time() < deadline and states() == before:
                assert proc.poll() is None, "the sweep ended before it could be interrupted"
                time.sleep(0.1)
            if not epochs_reported(sdir) or states() == before:
                pytest.fail("no trial reported an epoch, or Tune saved no state after it, within 150 s")
            os.kill(proc.pid, signal.SIGINT)  # the driver only, as Ctrl-C in its terminal
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 130 and f"fer-tune resume {sdir}" in out, out
        assert json.loads((sdir / "study.json").read_text())["ray_storage"] == "s3://fer/studies/t"
        assert not (sdir / "tune").exists() and st.exists(st.join(exp, "tuner.pkl"))
        assert sum(t.state.name == "COMPLETE" for t in study_trials(sdir)) < 2

        r = cli(env, "resume", sdir, "--quiet", "--num-cpus", "2")
        assert r.returncode == 0, r.stdout + r.stderr
        trials = study_trials(sdir)
        assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials), r.stdout + r.stderr
        rows = read_csv(sdir)
        assert len(rows) == 2 and all(row["epochs"] == "6" for row in rows), rows
        starts = [
            json.loads(line).get("start_epoch", 0)
            for d in st.listdir(exp)
            for line in (st.read_text(st.join(exp, d, "result.json")) or "").splitlines()
            if line.strip()
        ]
        assert max(starts) > 0  # a trial continued from its checkpoint in S3
        assert any(int(row["restarts"]) >= 1 for row in rows)

        # the study's own optuna.db lost: repair rebuilds it from the trials' results in S3
        (sdir / "optuna.db").unlink()
        r = cli(env, "repair", sdir)
        assert r.returncode == 0 and "2 trials" in r.stdout, r.stdout + r.stderr
        again = study_trials(sdir)
        assert [(t.number, t.state, t.params, t.values) for t in again] == [
            (t.number, t.state, t.params, t.values) for t in trials
        ]
    finally:
        server.stop()


def test_preflight_warns_of_a_storage_too_small_for_the_checkpoints():
    from fer_tune.tune.runtime.preflight import _judge

    driver = {"fer_tune": "1", "torch": "2", "ray": "3", "optuna": "4"}
    row = {
        "versions": dict(driver),
        "storage": {"sees_driver_file": True, "write": True, "error": "", "free": 2**30},
        "torch_gpus": 2,
        "nvidia_driver": True,
        "data_error": "",
    }
    fails, warns = _judge(row, driver, 2.0)
    assert not fails and len(warns) == 1 and "1.0 GiB free, less than the 1.8 GiB" in warns[0], warns
    row["storage"]["free"] = 100 * 2**30
    assert _judge(row, driver, 2.0) == ([], [])
