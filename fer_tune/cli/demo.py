"""`fer-tune demo`: the whole product on the embedded synthetic faces in a few minutes on a laptop CPU.

sweep (TPE + ASHA over optimizer, scheduler, lr, dropout) -> final stage (retrain + cosine fine-tune) -> report.
Every step is the real command's code; running the demo again continues an interrupted one.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .common import add_output_options, add_read_options, loader, output_mode, parser_with

log = logging.getLogger(__name__)

# The demo's own study: small enough for 2 CPU cores, broad enough to show ASHA and the comparisons.
SPACE = """\
name: demo
description: >
  The fer-tune demo: a small VGG variant on the embedded synthetic faces; TPE + ASHA over optimizer, scheduler,
  learning rate and dropout.
metric: val_acc
mode: max
sampler: tpe
seed: 0
num_samples: {trials}
max_epochs: {max_epochs}
early_stopping: {{type: asha, grace_period: 1, reduction_factor: 2}}
resources: {{cpu: 1, gpu: 0}}
data: {{path: "synthetic:{images}", protocol: paper}}
fixed:
  width: {width}
  train_crops: one
  test_crops: ten
  batch_size: 32
  threads: 1
  erase_p: 0.0   # no random erasing: a tiny model on 3,000 faces learns within the demo's few epochs
space:
  optimizer: {{type: categorical, choices: [sgd_nesterov, adam, adamw]}}
  scheduler: {{type: categorical, choices: [constant, rlrp, cosine]}}
  lr: {{type: float, low: 1.0e-3, high: 5.0e-2, log: true}}
  dropout: {{type: float, low: 0.0, high: 0.5}}
"""

BUDGETS = {
    # trials, max epochs per trial, images, width; final: epochs, fine-tune epochs, eval every
    "full": {
        "trials": 8,
        "max_epochs": 6,
        "images": 3000,
        "width": 0.125,
        "final": {"epochs": 15, "finetune_epochs": 3, "eval_every": 5},
    },
    "quick": {
        "trials": 4,
        "max_epochs": 2,
        "images": 1200,
        "width": 0.0625,
        "final": {"epochs": 3, "finetune_epochs": 1, "eval_every": 3},
    },
}


def run_demo(out: str, *, quick: bool, num_cpus: int | None, output: str, loader: Callable) -> int:
    """Sweep, final stage and report of the demo's study in `out` (continued when it exists)."""
    from ..report import write_report
    from ..tune.final.driver import run_final
    from ..tune.runtime.session import ray_session
    from ..tune.runtime.stage import RunOptions
    from ..tune.study.driver import resume, sweep
    from ..tune.study.record import STUDY_FILE
    from .final import print_final
    from .study import print_summary

    b = BUDGETS["quick" if quick else "full"]
    sdir = Path(out).resolve()
    t0 = time.time()
    opts = RunOptions(loader=loader, output=output)
    with ray_session(None, num_cpus=num_cpus, output=output):  # one local Ray for every step
        log.info(
            "[1/3] sweep: %d trials of at most %d epochs on %s synthetic faces (TPE + ASHA over optimizer, "
            "scheduler, lr, dropout)",
            b["trials"],
            b["max_epochs"],
            f"{b['images']:,}",
        )
        if (sdir / STUDY_FILE).exists():
            rc = resume(str(sdir), opts)
        else:
            with tempfile.TemporaryDirectory() as d:
                space = Path(d) / "demo.yaml"
                space.write_text(SPACE.format(**b))
                rc = sweep(
                    str(space),
                    opts,
                    data_arg=None,
                    name=sdir.name,
                    results=str(sdir.parent),
                    storage=None,
                    num_samples=None,
                    max_concurrent=None,
                    gpus=None,
                    cpus=None,
                    space_label="the demo's own space, built into fer-tune (fer_tune/cli/demo.py)",
                )
        if rc != 0:
            return rc
        print_summary(sdir)
        f = b["final"]
        log.info(
            "\n[2/3] final stage: the best trial retrained for %d epochs, fine-tuned for %d (cosine from lr "
            "1e-4 on train + val), evaluated with TenCrop",
            f["epochs"],
            f["finetune_epochs"],
        )
        rc = run_final(str(sdir), opts, trial=None, out=None, given=dict(f), gpus=None)
        if rc != 0:
            return rc
        print_final(sdir / "final")
    log.info("\n[3/3] report")
    report = write_report(sdir)
    print(
        f"\ndemo finished in {time.time() - t0:.0f} s.\n"
        f"  open the report:      {report}  (a browser, no server or internet needed)\n"
        f"  the trials:           fer-tune status {sdir}\n"
        f"  Optuna's dashboard:   fer-tune dashboard {sdir}  (pip install -e '.[dashboard]' first)\n"
        f"  try the model:        fer-tune predict {sdir / 'final' / 'model.pt'} FACE.jpg\n"
        "                        (it learnt synthetic faces: its answers for real photos mean nothing)\n"
        f"  a real study:         fer-tune sweep joint --data PATH/TO/fer2013 "
        "(a fer2013.csv or the Kaggle folders)",
        flush=True,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args.out, quick=args.quick, num_cpus=args.num_cpus, output=output_mode(args), loader=loader(args))


def register(sub: argparse._SubParsersAction) -> None:
    p = parser_with(
        sub,
        "demo",
        "the whole study on synthetic faces in minutes on a CPU: sweep, final stage, report",
        """
        fer-tune demo
        fer-tune demo --out /tmp/demo --quick
    """,
    )
    p.add_argument(
        "--out",
        default="results/demo",
        help="the demo's study directory (default results/demo); running again continues or re-reports it",
    )
    p.add_argument("--quick", action="store_true", help="a smaller budget (what the tests run)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray may use (default: all)")
    add_output_options(p)
    add_read_options(p)
    p.set_defaults(func=cmd_demo, data=None)
