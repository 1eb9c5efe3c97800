"""`fer-tune preflight`: is this Ray cluster ready for a long study? (see fer_tune/tune/runtime/preflight.py)"""

from __future__ import annotations

import argparse
import json

from ..common import FerTuneError
from .common import parser_with


def cmd_preflight(args: argparse.Namespace) -> int:
    from ..tune.runtime.preflight import run

    report = run(
        address=args.address, storage=args.storage, data=args.data, num_cpus=args.num_cpus, timeout=args.timeout
    )
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_table(report)
    if report["failures"]:
        n_bad = sum(1 for r in report["nodes"] if r["failures"])
        where = "the FAIL lines above" if not args.json else '"failures" in the JSON above'
        raise FerTuneError(
            f"preflight failed on {n_bad} of {len(report['nodes'])} node(s); failed checks: "
            f"{', '.join(report['failed_checks'])} (see {where})"
        )
    return 0


def _mark(fails: list[str], check: str) -> str:
    return "FAIL" if any(f.startswith(check + ":") for f in fails) else "ok"


def _free(n: int | None) -> str:
    """A node's free space in the storage (a local path or mount; '-' for a URI's)."""
    from ..tune.runtime.preflight import size_text

    return "-" if n is None else size_text(n)


def _print_table(r: dict) -> None:
    d = r["driver"]
    print(
        f"Ray cluster {r['address']}: {len(r['nodes'])} alive node(s), {r['gpus']:g} GPU(s); storage {r['storage']}"
        + (f"; data {r['data']}" if r["data"] else "")
    )
    print(f"driver: fer_tune {d['fer_tune']}, torch {d['torch']}, ray {d['ray']}, optuna {d['optuna']}")
    head = f"{'node':<28}{'ip':<16}{'versions':<10}{'storage':<9}{'free':<10}{'GPUs ray/torch':<16}{'data':<6}result"
    print(head)
    print("-" * len(head))
    for row in r["nodes"]:
        name = (row.get("hostname") or "?")[:18] + (" (head)" if row.get("head") else "")
        fails = row["failures"]
        if row.get("error"):
            cells = ["-", "-", "-", "-", "-"]
        else:
            cells = [
                _mark(fails, "versions"),
                _mark(fails, "storage"),
                _free(row["storage"].get("free")),
                f"{row['ray_gpus']:g}/{row['torch_gpus']}" + (" !" if _mark(fails, "gpu") != "ok" else ""),
                _mark(fails, "data") if r["data"] else "-",
            ]
        result = "FAIL" if fails else ("ok (warnings)" if row["warnings"] else "ok")
        print(
            f"{name:<28}{row.get('ip', ''):<16}{cells[0]:<10}{cells[1]:<9}{cells[2]:<10}{cells[3]:<16}{cells[4]:<6}"
            f"{result}"
        )
    for w in r["warnings"]:
        print(f"warning: {w}")
    for f in r["failures"]:
        print(f"FAIL: {f}")
    if not r["failures"]:
        print(
            "preflight passed: every node has the same versions, reaches the storage"
            + (" and the data" if r["data"] else "")
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = parser_with(
        sub,
        "preflight",
        "check every node of a Ray cluster before a long study",
        """
        fer-tune preflight                                    # a local Ray (this machine)
        fer-tune preflight --address auto --storage s3://my-bucket/fer-tune --data ~/data/fer2013.csv
        fer-tune preflight --address auto --storage /mnt/efs/fer-tune --json
    """,
    )
    p.add_argument(
        "--address", default=None, help="the Ray cluster (auto, ray://HOST:10001); default: start a local Ray"
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URI|DIR",
        help="the Ray storage a sweep will get (--storage of fer-tune sweep); every node must write, read "
        "and delete a file there and see the file this machine wrote (default: results, where a "
        "sweep without --storage keeps its files)",
    )
    p.add_argument(
        "--data", default=None, metavar="PATH", help="a dataset path every node should resolve (synthetic always does)"
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (without --address)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the nodes' answers (default 180)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_preflight)
