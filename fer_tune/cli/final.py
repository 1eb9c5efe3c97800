"""`fer-tune final`: a study's final stage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..recipe import BASELINES, FINAL_DEFAULTS
from ..tune.pbt.read import REPLAY_DIR
from .common import (
    add_force_option,
    add_mlflow_option,
    add_ray_options,
    add_read_options,
    parser_with,
    run_options,
)
from .report import refresh_report


def print_final(out: str | Path) -> None:
    """A finished final stage's results on stdout (from its metrics.json)."""
    from ..tune.final.outputs import result_lines

    f = Path(out) / "metrics.json"
    if f.is_file():
        print("\n".join(["", *result_lines(json.loads(f.read_text()), Path(out).resolve())]), flush=True)


def finish_final(rc: int, out: str | Path, study: str | Path, report: bool = True) -> int:
    """After a final-stage run: its results (when it finished) and the study's report (when it shows this stage)."""
    if rc in (0, 1):
        print_final(out)
    if report:
        refresh_report(study)
    return rc


def cmd_final(args: argparse.Namespace) -> int:
    from ..tune.final.driver import run_final

    given = {k: getattr(args, k) for k in FINAL_DEFAULTS}
    rc = run_final(
        args.study,
        run_options(args),
        trial=args.trial,
        out=args.out,
        given=given,
        gpus=args.gpus_per_run,
        cpus=args.cpus_per_run,
    )
    # the report shows STUDY/final (and STUDY/final-pbt in its PBT section)
    default = Path(args.study) / (REPLAY_DIR if args.from_pbt else "final")
    return finish_final(rc, args.out or default, args.study, report=args.out is None)


def register(sub: argparse._SubParsersAction) -> None:
    p = parser_with(
        sub,
        "final",
        "retrain a study's best configuration, fine-tune it, evaluate it (resumable)",
        f"""
        fer-tune final results/joint                      # {FINAL_DEFAULTS["epochs"]} epochs + {FINAL_DEFAULTS["finetune_epochs"]} fine-tune, 1 seed
        fer-tune final results/joint --seeds 3 --gpus-per-run 1 --address auto
        fer-tune final results/smoke --epochs 8 --finetune-epochs 3 --eval-every 2
        fer-tune final results/fer2013_cpu --epochs 12 --finetune-epochs 3 --seeds 2 --baseline paper
        fer-tune final results/joint                      # again: continues an interrupted final stage
        fer-tune final results/joint --from-pbt           # the PBT stage's best member, its schedule replayed
        fer-tune final results/joint --ensemble 3 --seeds 2 --baseline paper
    """,
    )
    p.add_argument("study", help="the study directory (results/NAME)")
    p.add_argument("--trial", type=int, default=None, help="use this trial number (default: the study's best)")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {FINAL_DEFAULTS['epochs']})")
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=None,
        help=f"fine-tune epochs from the best-val checkpoint (default {FINAL_DEFAULTS['finetune_epochs']})",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help=f"fine-tune starting lr (default {FINAL_DEFAULTS['finetune_lr']:g})",
    )
    p.add_argument(
        "--finetune-scheduler",
        choices=("cosine", "cosine_wr"),
        default=None,
        help="fine-tune schedule (default cosine)",
    )
    p.add_argument(
        "--finetune-on",
        choices=("train+val", "train"),
        default=None,
        help="fine-tune data (default train+val, as the paper)",
    )
    p.add_argument("--seeds", type=int, default=None, help="independent runs, in parallel (default 1)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help=f"test accuracy and a kept checkpoint every N epochs (default {FINAL_DEFAULTS['eval_every']})",
    )
    p.add_argument("--gpus-per-run", type=float, default=None, help="GPU fraction per seed (default: the study's)")
    p.add_argument("--cpus-per-run", type=float, default=None, help="CPUs per seed (default: the study's)")
    p.add_argument(
        "--baseline",
        choices=BASELINES,
        default=None,
        help="also retrain this recipe with the same epochs, fine-tune and seeds, and compare: paper = "
        "SGD-Nesterov lr 0.01 momentum 0.9, RLRP factor 0.75 patience 5, dropout 0.2, weight decay "
        "1e-4, batch 64 on the study's model, width, crops and data",
    )
    p.add_argument(
        "--from-pbt",
        action="store_true",
        default=None,
        help="retrain the best member of the study's PBT stage (fer-tune pbt) from scratch with its recorded "
        "schedule: its config, scheduler constant, and lr / weight_decay / dropout per epoch segment as it "
        "trained (--epochs default: the stage's; a longer run keeps the last values); then the usual fine-tune. "
        f"Default --out: STUDY/{REPLAY_DIR}",
    )
    p.add_argument(
        "--ensemble",
        type=int,
        default=None,
        metavar="K",
        help="retrain the study's K best distinct configurations (chosen on validation; of a multi-objective "
        "study, from its Pareto front; with --from-pbt, the PBT stage's K best members, each with its "
        "schedule) with the same recipe and seeds, and ensemble them: per seed, the mean of "
        "the members' softmax, measured on the test split beside each member; model.pt and model.onnx hold the "
        "whole ensemble (default 1: the best configuration alone)",
    )
    p.add_argument("--out", default=None, help="output directory (default: STUDY/final)")
    add_mlflow_option(p, "the final stage's, else the study's: its run goes into the study's experiment")
    add_force_option(p)
    add_ray_options(p)
    add_read_options(p)
    p.set_defaults(func=cmd_final)
