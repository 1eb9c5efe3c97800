"""What every stage's trial function shares inside Ray Tune."""

from __future__ import annotations

from pathlib import Path


def memory_mb() -> dict:
    """This trial process's resident memory: rss (shared pages counted in full), pss (shared pages split between
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
