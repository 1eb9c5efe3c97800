"""`fer-tune pbt`: population-based training seeded by a study's top configurations."""

from __future__ import annotations

import argparse

from .common import add_force_option, add_ray_options, add_read_options, parser_with, run_options
from .report import refresh_report

DETAILS = (
    "The population starts from the study's top-K configurations (members after the K-th repeat them with "
    "each mutated value x0.8 or x1.2) and trains for --epochs with scheduler=constant: the configs' own "
    "lr schedulers are switched off, and PBT's mutations are the schedule. Every --interval epochs a member in "
    "the bottom quarter takes the weights (and optimizer state) of one in the top quarter and goes on with its "
    "values perturbed (PBT: x0.8 or x1.2, or resampled within the range with probability 0.25; PB2: chosen by "
    "a Gaussian-process bandit). By default each member is ranked when it reaches an interval, against the "
    "others' latest results (Ray's asynchronous PBT: no member waits, and which member clones which depends on "
    "the order results arrive in); with --synch every member waits at each interval until all have reached it, "
    "then the bottom quarter clones the top quarter (the decisions then follow from the results alone). A key the study searches is kept in the study's range. The best member at the "
    "last epoch is evaluated on the test split with TenCrop and exported to STUDY/pbt/model.*; "
    "`fer-tune final STUDY --from-pbt` replays its schedule from scratch. Jaderberg et al. 2017, Population "
    "Based Training of Neural Networks; Parker-Holder et al. 2020, PB2. Again: continues an interrupted stage."
)


def cmd_pbt(args: argparse.Namespace) -> int:
    from ..tune.pbt.driver import DEFAULTS, run_pbt

    given = {k: getattr(args, k) for k in (*DEFAULTS, "method")}
    rc = run_pbt(args.study, run_options(args), given=given)
    if rc in (0, 1):
        print_pbt(args.study)
    refresh_report(args.study)
    return rc


def print_pbt(study: str) -> None:
    """The study's PBT stage on stdout (`fer-tune pbt` at its end, `fer-tune status`), when it has one."""
    from ..tune.pbt.read import status_lines

    for line in status_lines(study):
        print(line, flush=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = parser_with(
        sub,
        "pbt",
        "population-based training seeded by a study's top configurations (resumable)",
        """
        fer-tune pbt results/joint                                # the top 4 as 4 members
        fer-tune pbt results/joint --top-k 4 --population 8 --epochs 60 --interval 5
        fer-tune pbt results/smoke --mutate lr,dropout --method pb2
        fer-tune pbt results/joint                                # again: continues an interrupted stage
        fer-tune final results/joint --from-pbt                   # replay the best member's schedule
    """,
        DETAILS,
    )
    p.add_argument("study", help="the study directory (results/NAME); the stage goes to results/NAME/pbt")
    add_force_option(p)
    for flag, meaning in (
        ("--top-k", "seed the population with the K best trials (default 4)"),
        ("--population", "members (default: K; at least 2)"),
        ("--epochs", "epochs per member (default: the study's max_epochs)"),
        ("--interval", "epochs between perturbations; a checkpoint every epoch (default: epochs / 10, at least 1)"),
    ):
        p.add_argument(flag, type=int, default=None, help=meaning)
    p.add_argument(
        "--mutate",
        default=None,
        metavar="KEYS",
        help="comma-separated keys to perturb, among lr, weight_decay, dropout (default: all three)",
    )
    p.add_argument(
        "--synch",
        action="store_true",
        default=None,
        help="perturb the whole population at once at each interval (Ray's synch=True) instead of each member when "
        "it gets there",
    )
    p.add_argument(
        "--method",
        choices=("pbt", "pb2"),
        default=None,
        help="pbt: Ray's PopulationBasedTraining (default); pb2: PB2, its Gaussian-process bandit (needs "
        "scikit-learn: pip install -e '.[pb2]')",
    )
    add_ray_options(p)
    add_read_options(p)
    p.set_defaults(func=cmd_pbt)
