"""`fer-tune preflight`: before a long study, check from every alive node of a Ray cluster that

- the package and its versions (fer_tune, torch, ray, optuna) are there and match the driver's;
- the Ray storage is writable, readable and deletable there, and shows the file the driver wrote (shared);
- GPUs: what Ray offers (its GPU resource) and what torch sees;
- the data path resolves there (synthetic always does).

One tiny Ray task is pinned to each node (NodeAffinitySchedulingStrategy, soft=False) and asks for no CPU, so it
runs even on a busy node. `nodes_missing_file` is the same probe, reduced to "does every other node see this
file", which `check_study_storage` (called by sweep / resume / extend) uses to tell a shared mount from a
node-local path.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import uuid
from pathlib import Path

from ...common import FerTuneError
from ...data import identify
from . import storage as fs
from .session import ray_session
from .session import versions as driver_versions

log = logging.getLogger(__name__)

PROBE_PREFIX = ".fer-tune-preflight-"
CHECKS = ("node", "versions", "storage", "gpu", "data")


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _pinned(fn, node_id: str):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(fn).options(
        num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    )


def _gather(refs: list, timeout: float) -> list:
    """ray.get of each ref; an exception (or 'timeout') in place of a result that failed or did not come."""
    import ray

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    out = []
    for ref in refs:
        if ref not in ready:
            out.append(TimeoutError(f"no answer within {timeout:.0f} s"))
            continue
        try:
            out.append(ray.get(ref))
        except Exception as exc:  # the task failed on that node (e.g. fer_tune cannot be imported there)
            out.append(exc)
    return out


# ---------------------------------------------------------------------------------------------------------
# "does every other node see this file?" (the study engine's shared-storage test)
# ---------------------------------------------------------------------------------------------------------
def _sees(path: str, text: str) -> bool:
    return fs.read_text(path) == text


def nodes_missing_file(directory: str, node_ids: list[str], timeout: float = 60.0) -> int:
    """Write a probe file in `directory` here and count the nodes that answer they do not see it."""
    token = uuid.uuid4().hex
    probe = fs.join(directory, f"{PROBE_PREFIX}{token[:12]}")
    fs.write_text(probe, token)
    try:
        answers = _gather([_pinned(_sees, n).remote(probe, token) for n in node_ids], timeout)
    finally:
        fs.delete(probe)
    return sum(1 for a in answers if a is False)


def check_study_storage(loc: str, address: str | None, resources: dict) -> None:
    """Refuse (FerTuneError) a node-local Ray storage path on a multi-node cluster; called after ray.init.
    Multi-node: more than one alive node, or (joining a cluster) no alive node has what a trial asks for, so an
    autoscaler must add nodes. A path is shared when its filesystem is a network one or every other alive node
    sees a probe file written there."""
    import ray

    if fs.is_uri(loc):
        return
    nodes = alive_nodes()
    need_cpu, need_gpu = float(resources.get("cpu", 1)), float(resources.get("gpu", 0))
    grows = bool(address) and not any(
        n["Resources"].get("CPU", 0) >= need_cpu and n["Resources"].get("GPU", 0) >= need_gpu for n in nodes
    )
    if (len(nodes) <= 1 and not grows) or fs.filesystem_type(loc) in fs.NETWORK_FS:
        return
    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in nodes if n["NodeID"] != here]
    probe_dir = Path(loc)
    while not probe_dir.is_dir() and probe_dir != probe_dir.parent:  # nothing is created before the check
        probe_dir = probe_dir.parent
    unseen = nodes_missing_file(str(probe_dir), others) if others else None
    problem = fs.node_local_problem(loc, len(nodes), grows=grows, unseen=unseen)
    if problem:
        raise FerTuneError(problem)


def trials_at_once(resources: dict, nodes: list[dict]) -> int:
    """How many trials of `resources` the nodes ({"CPU": n, "GPU": n} each) hold at once (a trial sits on one
    node)."""
    need_cpu, need_gpu = float(resources.get("cpu", 1)), float(resources.get("gpu", 0))
    total = 0
    for n in nodes:
        fits = [int(n.get("CPU", 0) / need_cpu + 1e-9)] if need_cpu > 0 else []
        if need_gpu > 0:
            fits.append(int(n.get("GPU", 0) / need_gpu + 1e-9))
        total += min(fits) if fits else 0
    return total


def local_machine(num_cpus: int | None = None) -> dict:
    """{"CPU": n, "GPU": n} of this machine as a local Ray would count them, without starting Ray: --num-cpus or
    every CPU, and the NVIDIA GPUs (CUDA_VISIBLE_DEVICES when set, else the driver's /proc entries)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    else:
        proc = Path("/proc/driver/nvidia/gpus")
        gpus = len(list(proc.iterdir())) if proc.is_dir() else 0
    return {"CPU": num_cpus or os.cpu_count() or 1, "GPU": gpus}


def _amount(x: float) -> str:
    return f"{x:g}"


def check_trials_fit(resources: dict, address: str | None, fix: str, what: str = "trial") -> None:
    """Called after ray.init. A local Ray can never grow: if no node holds one `what` (its CPUs and GPUs), refuse
    (FerTuneError) with what is asked, what this machine has and `fix` (the flags that fix it). On a cluster an
    autoscaler may add such a node: say once what is being waited for, and go on."""
    need_cpu, need_gpu = float(resources.get("cpu", 1)), float(resources.get("gpu", 0))
    nodes = alive_nodes()
    if any(
        n["Resources"].get("CPU", 0) + 1e-9 >= need_cpu and n["Resources"].get("GPU", 0) + 1e-9 >= need_gpu
        for n in nodes
    ):
        return
    ask = f"{_amount(need_cpu)} CPU" + (f" and {_amount(need_gpu)} GPU" if need_gpu else "")
    biggest = max(nodes, key=lambda n: (n["Resources"].get("GPU", 0), n["Resources"].get("CPU", 0)), default=None)
    have = (
        f"{_amount(biggest['Resources'].get('CPU', 0))} CPU and {_amount(biggest['Resources'].get('GPU', 0))} GPU"
        if biggest
        else "no node"
    )
    if address is None:
        raise FerTuneError(
            f"each {what} asks for {ask}, but the local Ray on this machine has {have} and cannot "
            f"grow, so no {what} would ever start; {fix}"
        )
    log.warning(
        "fer-tune: no node of the Ray cluster can hold a %s yet (%s each; the largest node has %s); waiting "
        "for the cluster to add one (an autoscaler does this; a fixed cluster never will)",
        what,
        ask,
        have,
    )


# what check_run's refusal tells a study to do (a new one; one that continues with the resources it was launched with)
SWEEP_FIX = (
    "pass --cpus-per-trial N and --gpus-per-trial F that fit it (--gpus-per-trial 0 on a machine without "
    "a GPU), or --address to run on a Ray cluster"
)
RESUME_FIX = (
    "the study was launched with these resources per trial: run it on a Ray cluster that has them "
    "(--address), or on this machine with --num-cpus N to let Ray count more CPUs than it found"
)


def check_run(loc: str, address: str | None, resources: dict, fix: str, what: str = "trial") -> None:
    """Before a study's or final stage's runs start (Ray up): the Ray storage `loc` suits the cluster and one
    `what` of `resources` fits it (else `fix` says which flags help). The storage refusal comes first: before the
    note that the command waits for nodes."""
    check_study_storage(loc, address, resources)
    check_trials_fit(resources, address, fix, what)


def check_free_space(places: list[str | None], need: int, detail: str) -> None:
    """One warning per local filesystem among `places` (the study directory, the Ray storage; URIs are skipped)
    with less free space than `need` bytes: what the run's checkpoints will take (`detail` says how it was
    reckoned). A full disk stops a command cleanly and `resume` continues it, but a warning up front is cheaper."""
    seen: set[int] = set()
    for place in places:
        if place is None or fs.is_uri(place):
            continue
        path = Path(place).resolve()
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            dev, free = path.stat().st_dev, shutil.disk_usage(path).free
        except OSError:
            continue
        if dev in seen:
            continue
        seen.add(dev)
        if free < need:
            log.warning(
                "fer-tune: %s has %s free, and the checkpoints will need about %s (%s); a full disk stops the "
                "run (continue it once space is freed)",
                place,
                size_text(free),
                size_text(need),
                detail,
            )


def size_text(n: float) -> str:
    """Bytes as a person reads them: GiB, or MiB below one."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------------------
# the per-node report
# ---------------------------------------------------------------------------------------------------------
def _versions() -> dict:
    out = {}
    for name in ("fer_tune", "torch", "ray", "optuna"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # missing or broken on this node
            out[name] = f"missing ({type(exc).__name__})"
    return out


def _storage_probe(pdir: str, marker: str | None, token: str, node_id: str) -> dict:
    res: dict = {"sees_driver_file": None, "write": None, "error": ""}
    try:
        if marker is not None:
            res["sees_driver_file"] = fs.read_text(marker) == token
        probe = fs.join(pdir, f"node-{node_id[:12]}")
        fs.write_text(probe, node_id)
        back = fs.read_text(probe)
        fs.delete(probe)
        res["write"] = back == node_id and not fs.exists(probe)
        if not res["write"]:
            res["error"] = "the probe file read back differently or could not be deleted"
        if not fs.is_uri(pdir):
            res["free"] = shutil.disk_usage(pdir).free
        if res["sees_driver_file"] is False and not fs.is_uri(pdir):
            fs.delete(pdir, tree=True)  # that directory was created on this node's own disk
    except Exception as exc:
        res["write"] = False
        res["error"] = f"{type(exc).__name__}: {exc}"
    return res


def _data_probe(data: str | None) -> str:
    """'' when the data path resolves on this node, else why not."""
    if not data:
        return ""
    try:
        identify(data)
        return ""
    except Exception as exc:
        return str(exc)


def _node_report(pdir: str, marker: str | None, token: str, data: str | None) -> dict:
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    versions = _versions()
    try:
        import torch

        cuda = torch.cuda.device_count()
    except Exception:
        cuda = 0
    return {
        "node_id": node_id,
        "hostname": socket.gethostname(),
        "ip": ray.util.get_node_ip_address(),
        "versions": versions,
        "torch_gpus": cuda,
        "nvidia_driver": Path("/proc/driver/nvidia/version").exists(),
        "storage": _storage_probe(pdir, marker, token, node_id),
        "data_error": _data_probe(data),
    }


def _slot_need() -> int:
    """The checkpoints one running trial of the paper's network keeps (4) in bytes: what a trial slot needs."""
    from ...config import TrainConfig, checkpoint_bytes

    return 4 * checkpoint_bytes(TrainConfig())


def _judge(row: dict, driver: dict, ray_gpus: float) -> tuple[list[str], list[str]]:
    """(failures, warnings) of one node's report, each 'check: what'."""
    fails, warns = [], []
    if row.get("error"):
        return [f"node: {row['error']}"], []
    diff = [
        f"{k} {v} (driver {driver[k]})" if not v.startswith("missing") else f"{k} {v}"
        for k, v in row["versions"].items()
        if v != driver.get(k)
    ]
    if diff:
        fails.append("versions: " + ", ".join(diff))
    s = row["storage"]
    if s["write"] is False:
        fails.append(f"storage: cannot write, read back and delete a file there ({s['error']})")
    if s["sees_driver_file"] is False:
        fails.append("storage: does not see the file the driver wrote there (not shared storage)")
    need = _slot_need() * max(1, int(ray_gpus))
    if s.get("free") is not None and s["free"] < need:
        warns.append(
            f"storage: {size_text(s['free'])} free, less than the {size_text(need)} the checkpoints of the paper's network "
            f"take for {max(1, int(ray_gpus))} trial(s) at once (4 each: the latest 3 and the best)"
        )
    g, driver_present = row["torch_gpus"], row["nvidia_driver"]
    if ray_gpus and g < ray_gpus:
        msg = f"Ray offers {ray_gpus:g} GPU(s) but torch sees {g}"
        if driver_present:
            fails.append(f"gpu: {msg} (a CPU-only torch build or a CUDA/driver mismatch; trials would run on CPU)")
        else:
            warns.append(
                f"gpu: {msg} and the node has no NVIDIA driver (GPUs declared to Ray by hand?); "
                "trials placed here run on CPU"
            )
    elif g and not ray_gpus:
        warns.append(
            f"gpu: torch sees {g} GPU(s) that Ray does not offer; trials asking for GPUs are not "
            "placed here (start Ray with --num-gpus)"
        )
    if row["data_error"]:
        fails.append(f"data: {row['data_error']}")
    return fails, warns


def run(
    *, address: str | None, storage: str | None, data: str | None, num_cpus: int | None = None, timeout: float = 180.0
) -> dict:
    """Check every alive node; returns the report (fer_tune.cli.cluster prints it)."""
    loc = fs.normalize(storage or "results")
    if data and not data.startswith("synthetic"):
        data = os.path.abspath(os.path.expanduser(data))
    with ray_session(address, num_cpus=num_cpus):
        nodes = alive_nodes()
        driver = driver_versions()
        token = uuid.uuid4().hex
        pdir = fs.join(loc, f"{PROBE_PREFIX}{token[:12]}")
        marker, driver_error = fs.join(pdir, "driver"), ""
        try:
            fs.write_text(marker, token)
        except Exception as exc:
            marker, driver_error = None, f"{type(exc).__name__}: {exc}"
        try:
            answers = _gather(
                [_pinned(_node_report, n["NodeID"]).remote(pdir, marker, token, data) for n in nodes], timeout
            )
        finally:
            try:
                fs.delete(pdir, tree=True)
            except Exception:
                pass
        rows, failures, warnings = [], [], []
        for n, a in zip(nodes, answers):
            res = n.get("Resources", {})
            row = (
                a
                if isinstance(a, dict)
                else {
                    "node_id": n["NodeID"],
                    "ip": n.get("NodeManagerAddress", ""),
                    "error": f"{type(a).__name__}: {a}".splitlines()[0][:300],
                }
            )
            row.update(
                head="node:__internal_head__" in res,
                ray_gpus=float(res.get("GPU", 0)),
                ray_cpus=float(res.get("CPU", 0)),
            )
            row["failures"], row["warnings"] = _judge(row, driver, row["ray_gpus"])
            failures += [f"{_label(row)}: {f}" for f in row["failures"]]
            warnings += [f"{_label(row)}: {w}" for w in row["warnings"]]
            rows.append(row)
        checks = {f.split(":")[0] for r in rows for f in r["failures"]}
        if driver_error:
            failures.insert(0, f"driver: storage: cannot write to {loc} ({driver_error})")
            checks.add("storage")
        problem = fs.node_local_problem(loc, len(nodes), grows=bool(address) and len(nodes) == 1)
        if problem and len(nodes) == 1:  # an autoscaling cluster: the nodes it adds later cannot be checked now
            warnings.append(
                "storage: only one node is alive; nodes the autoscaler adds later will not see "
                f"{loc}, a path on this machine's own disk (use s3://... or a shared mount)"
            )
        return {
            "address": address or "local",
            "storage": loc,
            "data": data or "",
            "driver": driver,
            "nodes": rows,
            "gpus": sum(r["ray_gpus"] for r in rows),
            "failures": failures,
            "failed_checks": sorted(checks),
            "warnings": warnings,
            "ok": not failures,
        }


def _label(row: dict) -> str:
    return f"{row.get('hostname') or row.get('ip', '?')} ({row['node_id'][:8]}{', head' if row.get('head') else ''})"
