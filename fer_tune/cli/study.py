"""`fer-tune sweep | resume | extend | repair`: studies on Ray Tune + Optuna (`status`: fer_tune.cli.status)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_mlflow_option, add_ray_options, add_read_options, parser_with, run_options
from .report import refresh_report


def print_summary(sdir: str | Path) -> None:
    """The study's trials by state and its best trial, on stdout (from trials.csv, as the run left it)."""
    import csv

    from ..tune.study.outputs import summary_lines
    from ..tune.study.record import read_study

    sdir = Path(sdir).resolve()
    if not (sdir / "trials.csv").is_file():
        return
    with open(sdir / "trials.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    print("\n".join(["", *summary_lines(sdir, read_study(sdir)["spec"], table)]), flush=True)


def _finish(rc: int, sdir: str | Path) -> int:
    """After sweep / resume / extend: the summary of a finished run, and the study's report."""
    if rc == 0:
        print_summary(sdir)
    refresh_report(sdir)
    return rc


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..tune.study.driver import sweep
    from ..tune.study.spaces import load_space

    rc = sweep(
        args.space,
        run_options(args),
        data_arg=args.data,
        name=args.name,
        results=args.results,
        storage=args.storage,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        gpus=args.gpus_per_trial,
        cpus=args.cpus_per_trial,
        optuna_storage=args.optuna_storage,
        warm_start=args.warm_start,
    )
    sdir = Path(args.results) / (args.name or load_space(args.space).name)
    return _finish(rc, sdir)


def cmd_resume(args: argparse.Namespace) -> int:
    from ..tune.study.driver import resume

    if (Path(args.study) / "final.json").is_file():  # a final stage directory (results/NAME/final)
        from ..tune.final.driver import run_final
        from ..tune.runtime.stage import read_record
        from .final import finish_final

        rec = read_record(Path(args.study) / "final.json", "the final stage")
        rc = run_final(rec["study_dir"], run_options(args), trial=None, out=args.study, given={}, gpus=None)
        return finish_final(rc, args.study, rec["study_dir"])
    rc = resume(args.study, run_options(args))
    return _finish(rc, args.study)


def cmd_extend(args: argparse.Namespace) -> int:
    from ..tune.study.driver import extend

    rc = extend(args.study, run_options(args), num_samples=args.num_samples)
    return _finish(rc, args.study)


def cmd_repair(args: argparse.Namespace) -> int:
    from ..tune.study.repair import repair

    sdir = Path(args.study).resolve()
    done = repair(sdir, force=args.force)
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(done["states"].items())) or "none"
    print(f"rebuilt {sdir / 'optuna.db'} from the trials' own results: {done['trials']} trials ({states})")
    if done["skipped"]:
        print(
            f"left out {len(done['skipped'])} trial(s) whose parameters the study's space cannot express: "
            + ", ".join(done["skipped"][:10])
        )
    if done["aside"]:
        print(f"the {'damaged' if done['problem'] else 'previous'} database is kept as {done['aside']}")
    if done["renumbered"]:
        print(f"Tune's saved searcher states ({done['renumbered']}) now name the trials by their rebuilt numbers")
    if done["unfinished"]:
        print(f"next: fer-tune resume {sdir}")
    else:
        print(f"next: fer-tune status {sdir}, or fer-tune extend {sdir} --num-samples N")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = parser_with(
        sub,
        "sweep",
        "run a hyperparameter study (Ray Tune trials, Optuna search, early stopping)",
        """
        fer-tune sweep search_spaces/smoke.yaml
        fer-tune sweep smoke --name smoke-2                # a shipped space by name
        fer-tune sweep search_spaces/joint.yaml --data PATH/TO/fer2013 --gpus-per-trial 0.25
        fer-tune sweep search_spaces/joint.yaml --address auto --max-concurrent 16 --storage s3://my-bucket/fer-tune
        fer-tune sweep smoke --mlflow http://127.0.0.1:5000   # every trial a run in MLflow's experiment "smoke"
        fer-tune sweep joint --name joint-2 --warm-start results/joint:4   # the 4 best of a study run first
    """,
    )
    p.add_argument(
        "space",
        help="a search space YAML file, or the name of one that ships with fer-tune (smoke, "
        "joint, fer2013_cpu, ...: the files in search_spaces/)",
    )
    p.add_argument(
        "--data", default=None, metavar="PATH", help="dataset (default: the space's data.path, else synthetic)"
    )
    p.add_argument("--name", default=None, help="study name (default: the space's name); results go to RESULTS/NAME")
    p.add_argument("--results", default="results", help="results root (default: results)")
    p.add_argument(
        "--storage",
        default=None,
        metavar="URI|DIR",
        help="Ray storage for the trials' checkpoints and results: s3://BUCKET/PREFIX (any pyarrow "
        "filesystem URI) or a directory on a mount every node shares; the study gets a NAME folder "
        "there (default: RESULTS/NAME itself, fine for one machine; a multi-node cluster refuses a "
        "node-local path). study.json, optuna.db and trials.csv stay in RESULTS/NAME",
    )
    p.add_argument(
        "--optuna-storage",
        default=None,
        metavar="URL",
        help="the Optuna database: a SQLAlchemy URL (postgresql://USER@HOST/DB) or env:VAR naming an "
        "environment variable that holds one, e.g. with a password (default: sqlite "
        "RESULTS/NAME/optuna.db on this machine)",
    )
    add_mlflow_option(p, "no tracking")
    p.add_argument("--num-samples", type=int, default=None, help="number of trials (default: the space's)")
    p.add_argument(
        "--warm-start",
        action="append",
        default=None,
        metavar="results/OTHER[:K]",
        help="run another study's K best distinct configurations (default 4) first, those this space can express "
        "(after the paper's recipe, trial 0 unless the space says warm_start: none); may be given again",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="at most this many trials at once; also how many trials Tune keeps waiting for resources: "
        "on an autoscaling cluster give the pool's trial capacity so that nodes are requested for "
        "all of them at once (default: no limit; as many trials wait at once as the cluster's "
        "current resources hold)",
    )
    p.add_argument("--gpus-per-trial", type=float, default=None, help="GPU fraction per trial (0.25 = 4 per GPU)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial (default: the space's)")
    add_ray_options(p)
    add_read_options(p)
    p.set_defaults(func=cmd_sweep)

    p = parser_with(
        sub,
        "resume",
        "continue an interrupted study where it stopped",
        """
        fer-tune resume results/joint
        fer-tune resume results/joint --force     # even though the space file or data changed
        fer-tune resume results/joint/final       # an interrupted final stage
    """,
    )
    p.add_argument("study", help="the study directory (results/NAME), or a final stage's (results/NAME/final)")
    p.add_argument(
        "--force",
        action="store_true",
        help="resume although the recorded fingerprint changed, or "
        "although the study's lock was recorded by a command on another machine (check it has ended)",
    )
    add_mlflow_option(p, "the study's, recorded by sweep; with it, a complete study's runs are caught up")
    add_ray_options(p)
    add_read_options(p)
    p.set_defaults(func=cmd_resume)

    p = parser_with(
        sub,
        "extend",
        "add trials to a finished study, informed by all earlier ones",
        """
        fer-tune extend results/joint --num-samples 16
    """,
    )
    p.add_argument("study", help="the study directory (results/NAME)")
    p.add_argument("--num-samples", type=int, required=True, help="how many trials to add")
    p.add_argument(
        "--force",
        action="store_true",
        help="extend although the recorded fingerprint changed, or "
        "although the study's lock was recorded by a command on another machine (check it has ended)",
    )
    add_mlflow_option(p, "the study's, recorded by sweep")
    add_ray_options(p)
    add_read_options(p)
    p.set_defaults(func=cmd_extend)

    p = parser_with(
        sub,
        "repair",
        "rebuild a study's damaged or lost optuna.db from its trials' own results",
        """
        fer-tune repair results/joint
        fer-tune repair results/joint --force     # rebuild a database that reads whole
    """,
        details="Each trial's parameters, per-epoch values and state are read from Tune's files in the study (its "
        "saved state, each trial's params.json and result.json) and written, in the order the study made them, "
        "to a new optuna.db; the damaged one is kept as optuna.db.damaged-TIME. resume and extend then go on "
        "with the sampler's full history. Only a study's own sqlite database can be rebuilt (not one on a "
        "database server). A grid study's trials keep the grid points they visited; CMA-ES, NSGA-II and QMC "
        "samplers, which keep state of their own in Optuna's trials, start theirs afresh from the rebuilt "
        "history.",
    )
    p.add_argument("study", help="the study directory (results/NAME)")
    p.add_argument("--force", action="store_true", help="rebuild the database even though it reads whole")
    p.set_defaults(func=cmd_repair)
