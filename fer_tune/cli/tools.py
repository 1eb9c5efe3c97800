"""`fer-tune space check | dashboard`: a search space looked at before a study, and a study through
optuna-dashboard."""

from __future__ import annotations

import argparse
import json

from ..common import FerTuneError
from .common import add_read_options, load_data, parser_with


def cmd_space_check(args: argparse.Namespace) -> int:
    from ..data import is_synthetic
    from ..tune.study.space_check import capacity, report, report_lines
    from ..tune.study.spaces import load_space

    spec = load_space(args.space)
    required = bool(spec.data.get("required"))
    source = args.data or spec.data.get("path")
    if args.data and required and is_synthetic(args.data):
        raise FerTuneError(f"{args.space} is a study of real faces: --data must name real images, not synthetic")
    try:
        data = load_data(args, spec.data.get("protocol", "paper"), source) if source or not required else None
    except FerTuneError as exc:
        if args.data or not source:
            raise
        raise FerTuneError(f"{args.space}: data.path: {exc}") from None  # the space's own data
    r = report(spec, capacity(spec, args.address, args.num_cpus), data, required)
    if args.json:
        print(json.dumps(r, indent=2, default=str))
    else:
        print("\n".join(report_lines(r)))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from ..tune.study.dashboard import serve

    return serve(args.study, args.port)


def register(sub: argparse._SubParsersAction) -> None:
    space = sub.add_parser("space", help="check a search space before a study", description="search spaces")
    space_sub = space.add_subparsers(dest="space_command", metavar="COMMAND")
    space.set_defaults(func=lambda _args: space.print_help() or 2)
    p = parser_with(
        space_sub,
        "check",
        "validate a space without running a trial: parameters, grid, epoch budget, trials at once",
        """
        fer-tune space check search_spaces/joint.yaml
        fer-tune space check fer2013_cpu --data PATH/TO/fer2013
        fer-tune space check joint --address auto --json
    """,
    )
    p.add_argument("space", help="a search space YAML file, or the name of a shipped one (smoke, joint, ...)")
    p.add_argument(
        "--data", default=None, metavar="PATH", help="also read this dataset (default: the space's data.path)"
    )
    p.add_argument(
        "--address", default=None, help="count the trials at once on this Ray cluster (default: this machine)"
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs a local Ray would use (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_read_options(p)
    p.set_defaults(func=cmd_space_check)

    p = parser_with(
        sub,
        "dashboard",
        "serve optuna-dashboard for a study's Optuna storage on 127.0.0.1 (pip install -e '.[dashboard]')",
        """
        fer-tune dashboard results/joint
        fer-tune dashboard results/joint --port 8081
        ssh -L 8080:127.0.0.1:8080 HEAD  # then, on the head node: fer-tune dashboard results/joint
    """,
    )
    p.add_argument("study", help="the study directory (results/NAME)")
    p.add_argument("--port", type=int, default=8080, help="the port on 127.0.0.1 (default 8080; 0: any free one)")
    p.set_defaults(func=cmd_dashboard)
