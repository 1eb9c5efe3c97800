"""`fer-tune sweep | resume | extend | status`: studies on Ray Tune + Optuna."""

from __future__ import annotations

import json
from pathlib import Path

from .cli_report import refresh_report


def _loader(args, load_data):
    """(source, protocol) -> FerData with this command's cache / resize / skip-bad-rows options."""

    def load(source: str, protocol: str):
        args.data = source
        return load_data(args, protocol)

    return load


def _data_options(p) -> None:
    p.add_argument("--cache-dir", default=None, help="where parsed datasets are cached (default ~/.cache/fer-tune)")
    p.add_argument("--resize", action="store_true", help="resize images that are not 48x48 instead of refusing them")
    p.add_argument("--skip-bad-rows", action="store_true", help="drop bad rows/files and report them")


def _common(p) -> None:
    p.add_argument("--address", default=None, help="join a running Ray cluster (auto, ray://HOST:10001); default: "
                                                   "start a local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray may use (default: all)")
    p.add_argument("--quiet", action="store_true", help="no Tune progress tables")


def cmd_sweep(args, load_data) -> int:
    from .study import sweep

    data_arg = args.data
    rc = sweep(args.space, data_arg=data_arg, name=args.name, results=args.results, storage=args.storage,
               address=args.address, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
               gpus=args.gpus_per_trial, cpus=args.cpus_per_trial, quiet=args.quiet,
               loader=_loader(args, load_data), num_cpus=args.num_cpus, optuna_storage=args.optuna_storage)
    from .spaces import load_space

    refresh_report(Path(args.results) / (args.name or load_space(args.space).name))
    return rc


def cmd_resume(args, load_data) -> int:
    from pathlib import Path

    from .study import resume

    if (Path(args.study) / "final.json").is_file():  # a final stage directory (results/NAME/final)
        from .final import run_final

        rec = json.loads((Path(args.study) / "final.json").read_text())
        rc = run_final(rec["study_dir"], trial=None, out=args.study, given={}, gpus=None, address=args.address,
                       quiet=args.quiet, loader=_loader(args, load_data), num_cpus=args.num_cpus, force=args.force)
        refresh_report(rec["study_dir"])
        return rc
    rc = resume(args.study, force=args.force, address=args.address, quiet=args.quiet,
                loader=_loader(args, load_data), num_cpus=args.num_cpus)
    refresh_report(args.study)
    return rc


def cmd_extend(args, load_data) -> int:
    from .study import extend

    rc = extend(args.study, num_samples=args.num_samples, force=args.force, address=args.address,
                quiet=args.quiet, loader=_loader(args, load_data), num_cpus=args.num_cpus)
    refresh_report(args.study)
    return rc


def cmd_status(args) -> int:
    from .study import read_study
    from .trials import status_summary

    record = read_study(args.study)
    s = status_summary(args.study, record)
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return 0
    metric = s["metric"]
    print(f"study {s['name']} ({s['directory']}): {s['finished']}/{s['num_samples']} trials finished "
          f"({', '.join(f'{n} {k}' for k, n in sorted(s['states'].items())) or 'none yet'}); "
          f"{s['epochs_trained']} epochs trained, {s['device_hours']:.3f} device-hours")
    from .lock import running_line

    for what, info in s["running"].items():
        print(running_line(what, info))
    params = [k for k in (s["rows"][0] if s["rows"] else {}) if k.startswith("param_")]
    # every column as wide as its widest value
    widths = [max([len(p) - 6, *(len(_fmt(r[p])) for r in s["rows"])]) for p in params]
    sw = max([len("status"), *(len(r["status"]) for r in s["rows"])])
    print(f"{'#':>4} {'status':<{sw}} {'epochs':>6}{'best ' + metric:>14}  "
          + "  ".join(f"{p[6:]:<{w}}" for p, w in zip(params, widths)).rstrip())
    for r in s["rows"]:
        best = f"{r['best_' + metric]:.2f}" if r["best_" + metric] != "" else "-"
        vals = "  ".join(f"{_fmt(r[p]):<{w}}" for p, w in zip(params, widths)).rstrip()
        print(f"{r['number']:>4} {r['status']:<{sw}} {r['epochs']:>6}{best:>14}  {vals}")
    if s["best"]:
        b = s["best"]
        print(f"best: trial {b['number']} {metric} {b['best_' + metric]:.2f} (epoch {b['best_epoch']})")
    return 0


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v) if v != "" else "-"


def register(sub, parser_with, load_data) -> None:
    p = parser_with(sub, "sweep", "run a hyperparameter study (Ray Tune trials, Optuna search, early stopping)", """
        fer-tune sweep search_spaces/smoke.yaml
        fer-tune sweep search_spaces/joint.yaml --data ../shared/datasets/fer2013 --gpus-per-trial 0.25
        fer-tune sweep search_spaces/joint.yaml --address auto --max-concurrent 16 --storage s3://my-bucket/fer-tune
    """)
    p.add_argument("space", help="search space YAML (see search_spaces/)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="dataset (default: the space's data.path, else synthetic)")
    p.add_argument("--name", default=None, help="study name (default: the space's name); results go to RESULTS/NAME")
    p.add_argument("--results", default="results", help="results root (default: results)")
    p.add_argument("--storage", default=None, metavar="URI|DIR",
                   help="Ray storage for the trials' checkpoints and results: s3://BUCKET/PREFIX (any pyarrow "
                        "filesystem URI) or a directory on a mount every node shares; the study gets a NAME folder "
                        "there (default: RESULTS/NAME itself, fine for one machine; a multi-node cluster refuses a "
                        "node-local path). study.json, optuna.db and trials.csv stay in RESULTS/NAME")
    p.add_argument("--optuna-storage", default=None, metavar="URL",
                   help="the Optuna database: a SQLAlchemy URL (postgresql://USER@HOST/DB) or env:VAR naming an "
                        "environment variable that holds one, e.g. with a password (default: sqlite "
                        "RESULTS/NAME/optuna.db on this machine)")
    p.add_argument("--num-samples", type=int, default=None, help="number of trials (default: the space's)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="at most this many trials at once; also how many trials Tune keeps waiting for resources: "
                        "on an autoscaling cluster give the pool's trial capacity so that nodes are requested for "
                        "all of them at once (default: no limit; as many trials wait at once as the cluster's "
                        "current resources hold)")
    p.add_argument("--gpus-per-trial", type=float, default=None, help="GPU fraction per trial (0.25 = 4 per GPU)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial (default: the space's)")
    _common(p)
    _data_options(p)
    p.set_defaults(func=lambda a: cmd_sweep(a, load_data))

    p = parser_with(sub, "resume", "continue an interrupted study where it stopped", """
        fer-tune resume results/joint
        fer-tune resume results/joint --force     # even though the space file or data changed
        fer-tune resume results/joint/final       # an interrupted final stage
    """)
    p.add_argument("study", help="the study directory (results/NAME), or a final stage's (results/NAME/final)")
    p.add_argument("--force", action="store_true", help="resume although the recorded fingerprint changed, or "
                   "although the study's lock was recorded by a command on another machine (check it has ended)")
    _common(p)
    _data_options(p)
    p.set_defaults(func=lambda a: cmd_resume(a, load_data))

    p = parser_with(sub, "extend", "add trials to a finished study, informed by all earlier ones", """
        fer-tune extend results/joint --num-samples 16
    """)
    p.add_argument("study", help="the study directory (results/NAME)")
    p.add_argument("--num-samples", type=int, required=True, help="how many trials to add")
    p.add_argument("--force", action="store_true", help="extend although the recorded fingerprint changed, or "
                   "although the study's lock was recorded by a command on another machine (check it has ended)")
    _common(p)
    _data_options(p)
    p.set_defaults(func=lambda a: cmd_extend(a, load_data))

    p = parser_with(sub, "status", "trials, states, best result and device-hours of a study", """
        fer-tune status results/joint
        fer-tune status results/joint --json
    """)
    p.add_argument("study", help="the study directory (results/NAME); never disturbs a command running it")
    p.add_argument("--json", action="store_true", help="print everything as JSON (the rows of trials.csv, who runs "
                                                     "the study now)")
    p.set_defaults(func=cmd_status)
