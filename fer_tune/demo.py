"""`fer-tune demo`: the whole product on the embedded synthetic faces in a few minutes on a laptop CPU.

sweep (TPE + ASHA over optimizer, scheduler, lr, dropout) -> final stage (retrain + cosine fine-tune) -> report.
Every step is the real command's code; running the demo again continues an interrupted one.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

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
    "full": {"trials": 8, "max_epochs": 6, "images": 3000, "width": 0.125,
             "final": {"epochs": 15, "finetune_epochs": 3, "eval_every": 5}},
    "quick": {"trials": 4, "max_epochs": 2, "images": 1200, "width": 0.0625,
              "final": {"epochs": 3, "finetune_epochs": 1, "eval_every": 3}},
}


def run_demo(out: str, *, quick: bool, num_cpus: int | None, quiet: bool, loader) -> int:

    from .final import run_final
    from .report import write_report
    from .study import STUDY_FILE, _init_ray, _stop, resume, sweep

    b = BUDGETS["quick" if quick else "full"]
    sdir = Path(out).resolve()
    t0 = time.time()
    started = _init_ray(None, True, num_cpus)  # one local Ray for every step
    try:
        print(f"[1/3] sweep: {b['trials']} trials of at most {b['max_epochs']} epochs on {b['images']:,} synthetic "
              f"faces (TPE + ASHA over optimizer, scheduler, lr, dropout)", flush=True)
        if (sdir / STUDY_FILE).exists():
            rc = resume(str(sdir), force=False, address=None, quiet=quiet, loader=loader)
        else:
            with tempfile.TemporaryDirectory() as d:
                space = Path(d) / "demo.yaml"
                space.write_text(SPACE.format(**b))
                rc = sweep(str(space), data_arg=None, name=sdir.name, results=str(sdir.parent), storage=None,
                           address=None, num_samples=None, max_concurrent=None, gpus=None, cpus=None, quiet=quiet,
                           loader=loader)
        if rc != 0:
            return rc
        f = b["final"]
        print(f"\n[2/3] final stage: the best trial retrained for {f['epochs']} epochs, fine-tuned for "
              f"{f['finetune_epochs']} (cosine from lr 1e-4 on train + val), evaluated with TenCrop", flush=True)
        rc = run_final(str(sdir), trial=None, out=None, given=dict(f), gpus=None, address=None, quiet=quiet,
                       loader=loader)
        if rc != 0:
            return rc
    finally:
        _stop(started)
    print("\n[3/3] report", flush=True)
    report = write_report(sdir)
    print(f"\ndemo finished in {time.time() - t0:.0f} s.\n"
          f"  open the report:      {report}  (a browser, no server or internet needed)\n"
          f"  the trials:           fer-tune status {sdir}\n"
          f"  Optuna's dashboard:   optuna-dashboard sqlite:///{sdir / 'optuna.db'}\n"
          f"  classify a face:      fer-tune predict {sdir / 'final' / 'model.pt'} FACE.jpg\n"
          f"  a real study:         fer-tune sweep search_spaces/joint.yaml --data PATH/TO/fer2013 "
          "(a fer2013.csv or the Kaggle folders)", flush=True)
    return 0
