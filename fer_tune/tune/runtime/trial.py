"""What every stage's trial function shares inside Ray Tune: the result it reports (scalars only, where it ran,
its memory, the device-seconds it used) and the report itself, with a checkpoint directory the stage fills."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoints import write_meta

# How often a trial process reads its memory, at most: /proc/self/smaps of a process that has loaded PyTorch holds
# some 25,000 lines and takes about 40 ms of CPU to read, which an epoch of a few seconds would notice. A report
# within MEMORY_S of the last reading carries that reading.
MEMORY_S = 10.0
_LAST_READING: list[tuple[float, dict]] = []  # (time.monotonic(), memory_mb's figures): this process's last


def device_seconds(weight: float, *histories: list[dict]) -> float:
    """Device-seconds of the epochs in `histories`: their seconds times the devices a trial holds (its GPUs, else
    its CPUs)."""
    return weight * sum(h["epoch_seconds"] for history in histories for h in history)


def where(device: Any) -> dict:
    """Where the trial runs: its node and the device it trains on."""
    import ray

    return {
        "node": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id()[:12],
        "device": str(device),
    }


def report(result: dict, write: Callable[[Path], None] | None) -> None:
    """tune.report(result) with this process's memory (memory_mb), and a checkpoint when `write` is given: it
    fills a fresh directory, beside which the result goes (write_meta) before Tune takes it."""
    from ray import tune

    result.update(memory_mb())
    if write is None:
        tune.report(result)
        return
    with tempfile.TemporaryDirectory() as d:
        write(Path(d))
        write_meta(Path(d), result)
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))


def memory_mb() -> dict:
    """This trial process's resident memory, read at most every MEMORY_S seconds (`_read_memory`)."""
    now = time.monotonic()
    if not _LAST_READING or now - _LAST_READING[0][0] >= MEMORY_S:
        _LAST_READING[:] = [(now, _read_memory())]
    return dict(_LAST_READING[0][1])


def _read_memory() -> dict:
    """This process's resident memory now: rss (shared pages counted in full), pss (shared pages split between
    the processes that map them) and uss (private pages only; the dataset in Ray's object store is not in it);
    store_rss / store_pss: the part that is Ray's object store (its /dev/shm plasma mapping), where the dataset
    lives: a store_pss well under store_rss means other processes map the same pages."""
    kb: dict[str, int] = {}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                kb[key] = int(rest.split()[0])
        in_store = False
        with open("/proc/self/smaps") as fh:
            for line in fh:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:  # a mapping's header line
                    in_store = "/plasma" in line
                elif in_store and line.startswith(("Rss:", "Pss:")):
                    key = "store_" + line[:3]
                    kb[key] = kb.get(key, 0) + int(line.split()[1])
    except (OSError, ValueError, IndexError):  # not Linux
        return {}
    return {
        "rss_mb": round(kb.get("Rss", 0) / 1024, 1),
        "pss_mb": round(kb.get("Pss", 0) / 1024, 1),
        "store_rss_mb": round(kb.get("store_Rss", 0) / 1024, 1),
        "store_pss_mb": round(kb.get("store_Pss", 0) / 1024, 1),
        "uss_mb": round((kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024, 1),
    }
