"""`fer-tune slurm`: a study, its final stage or its PBT stage as a SLURM batch job (fer_tune/tune/slurm/)."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

from ..common import FerTuneError
from ..recipe import BASELINES, FINAL_DEFAULTS, check_final_options
from .common import add_output_options, add_read_options, parser_with

# the options handed to the driver: (flag, dest, takes a value); which commands take them
SWEEP_OPTIONS = (
    ("--data", "data", True),
    ("--storage", "storage", True),
    ("--optuna-storage", "optuna_storage", True),
    ("--num-samples", "num_samples", True),
    ("--max-concurrent", "max_concurrent", True),
    ("--gpus-per-trial", "gpus_per_trial", True),
    ("--cpus-per-trial", "cpus_per_trial", True),
    ("--warm-start", "warm_start", True),
)
FINAL_OPTIONS = (
    ("--trial", "trial", True),
    ("--epochs", "epochs", True),
    ("--finetune-epochs", "finetune_epochs", True),
    ("--finetune-lr", "finetune_lr", True),
    ("--finetune-scheduler", "finetune_scheduler", True),
    ("--finetune-on", "finetune_on", True),
    ("--seeds", "seeds", True),
    ("--eval-every", "eval_every", True),
    ("--gpus-per-run", "gpus_per_run", True),
    ("--cpus-per-run", "cpus_per_run", True),
    ("--baseline", "baseline", True),
    ("--ensemble", "ensemble", True),
    ("--from-pbt", "from_pbt", False),
    ("--out", "out", True),
)
PBT_OPTIONS = (
    ("--top-k", "top_k", True),
    ("--population", "population", True),
    ("--epochs", "epochs", True),
    ("--interval", "interval", True),
    ("--mutate", "mutate", True),
    ("--method", "method", True),
    ("--synch", "synch", False),
)
MLFLOW_OPTION = (("--mlflow", "mlflow", True),)
SIGNAL_EARLY = 60  # sbatch --signal: "the signal may be sent up to 60 seconds earlier than specified"
SHORT_ALLOCATION = 300  # seconds an allocation should give the driver at least
COMMON_OPTIONS = (
    *MLFLOW_OPTION,
    ("--cache-dir", "cache_dir", True),
    ("--resize", "resize", False),
    ("--skip-bad-rows", "skip_bad_rows", False),
    ("--quiet", "quiet", False),
    ("--verbose", "verbose", False),
)


def _given(args: argparse.Namespace, table: tuple) -> list[str]:
    """The options of `table` given on the command line, as driver arguments (paths made absolute)."""
    out: list[str] = []
    for flag, dest, value in table:
        v = getattr(args, dest, None)
        if v is None or v is False:
            continue
        if not value:
            out.append(flag)
            continue
        for one in v if isinstance(v, list) else [v]:  # a repeatable option, once per value
            out += [flag, _absolute(dest, str(one))]
    return out


def _absolute(dest: str, v: str) -> str:
    """A path option's value as an absolute path (the job runs elsewhere); a warm start's :K kept."""
    if dest == "warm_start":
        from ..tune.study.warmstart import parse_source

        path, k = parse_source(v)
        return str(path.expanduser().absolute()) + ("" if path == Path(v) else f":{k}")
    if dest in ("data", "storage", "cache_dir", "out") and "://" not in v and not v.startswith("synthetic"):
        return str(Path(v).expanduser().absolute())
    return v


def _refuse(args: argparse.Namespace, table: tuple, why: str) -> None:
    given = [flag for flag, dest, _ in table if getattr(args, dest, None) not in (None, False)]
    if given:
        raise FerTuneError(f"{' '.join(given)}: {why}")


def _with_resources(resources: dict, cpus: float | None, gpus: float | None) -> dict:
    """`resources` with the command line's CPUs and GPUs per trial (per run)."""
    return {**resources, **({"cpu": cpus} if cpus is not None else {}), **({"gpu": gpus} if gpus is not None else {})}


def _as_sweep_takes_it(spec, args: argparse.Namespace):
    """A new study's spec with the sweep options of the command line, refused here as `fer-tune sweep` would
    refuse them, not in the job after its wait in the queue."""
    from ..data import identify
    from ..tune.study.record import spec_with

    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise FerTuneError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    overrides: dict = {"num_samples": args.num_samples} if args.num_samples is not None else {}
    if args.cpus_per_trial is not None or args.gpus_per_trial is not None:
        overrides["resources"] = _with_resources(spec.resources, args.cpus_per_trial, args.gpus_per_trial)
    if overrides:
        spec = spec_with(spec.text, overrides, f"{args.target} (with command-line overrides)", spec.name)
    data = args.data or spec.data.get("path")
    if data and "://" not in data:
        try:
            identify(str(Path(data).expanduser()))
        except FerTuneError as exc:
            raise FerTuneError(str(exc) if args.data else f"{args.target}: data.path: {exc}") from None
    return spec


def cmd_slurm(args: argparse.Namespace) -> int:
    from ..tune.pbt.read import PBT_DIR, REPLAY_DIR
    from ..tune.slurm import job as slurm
    from ..tune.slurm.script import SCRIPT, render
    from ..tune.study.record import STUDY_FILE, read_study, study_dir
    from ..tune.study.spaces import load_space

    target = Path(args.target)
    existing = target.is_dir() and (target / STUDY_FILE).is_file()
    common = _given(args, COMMON_OPTIONS)
    force = ["--force"] if args.force else []
    storage = data = None
    per_node = None  # the runs each node holds at once, where the stage needs them all at once
    if args.final and args.pbt:
        raise FerTuneError("--final and --pbt: one stage per job; write one for each (the final one with --from-pbt)")
    sweep_given = SWEEP_OPTIONS + (("--name", "name", True),)
    only_pbt = tuple(o for o in PBT_OPTIONS if o not in FINAL_OPTIONS)
    if args.final or args.pbt:
        flag = "--final" if args.final else "--pbt"
        if not existing:
            raise FerTuneError(f"{flag}: {args.target} is not a study directory (results/NAME with {STUDY_FILE})")
        _refuse(args, sweep_given, f"sweep options do not apply to the {'final' if args.final else 'PBT'} stage")
        sdir = target.resolve()
        record = read_study(sdir)
        resources = dict(record["spec"].get("resources", {}))
        storage = record.get("ray_storage")
    if args.final:
        _refuse(args, only_pbt, "PBT-stage options need --pbt")
        given = {k: getattr(args, k, None) for k in FINAL_DEFAULTS}
        check_final_options(given, trial=args.trial, gpus=args.gpus_per_run, cpus=args.cpus_per_run)
        resources = _with_resources(resources, args.cpus_per_run, args.gpus_per_run)
        default_out = sdir / (REPLAY_DIR if args.from_pbt else "final")
        out = Path(args.out).expanduser().absolute() if args.out else default_out
        first = again = ["final", str(sdir), *_given(args, FINAL_OPTIONS), *force, *common]
        what, name, stage_name = f"the final stage of study {sdir.name}", f"{sdir.name}-final", "final stage"
    elif args.pbt:
        from ..tune.pbt.driver import settings_of

        _refuse(args, tuple(o for o in FINAL_OPTIONS if o not in PBT_OPTIONS), "final-stage options need --final")
        _refuse(args, MLFLOW_OPTION, "the PBT stage does not log to MLflow")
        pbt = settings_of({dest: getattr(args, dest) for _, dest, _ in PBT_OPTIONS}, record["spec"]["max_epochs"])
        per_node = math.ceil(pbt["population"] / args.nodes)  # the population trains at once, spread on the nodes
        out = sdir / PBT_DIR
        first = again = ["pbt", str(sdir), *_given(args, PBT_OPTIONS), *force, *common]
        what, name, stage_name = f"the PBT stage of study {sdir.name}", f"{sdir.name}-pbt", "PBT stage"
    else:
        _refuse(args, FINAL_OPTIONS, "final-stage options need --final")
        _refuse(args, only_pbt, "PBT-stage options need --pbt")
        if existing:
            _refuse(args, sweep_given, f"{args.target} already holds a study, which keeps the settings it started with")
            sdir = out = target.resolve()
            record = read_study(sdir)
            resources = dict(record["spec"].get("resources", {}))
            first = again = ["resume", str(sdir), *force, *common]
            storage = record.get("ray_storage")
        else:
            if target.is_dir() and (target / SCRIPT).is_file():
                read_study(target)  # says that the job written there has not started the study yet
            spec = load_space(args.target)  # a space file or a shipped space's name
            sdir = out = study_dir(args.results, args.name, spec.name, args.target)
            if (sdir / STUDY_FILE).is_file():
                raise FerTuneError(
                    f"{sdir} already holds a study; `fer-tune slurm {sdir}` writes the job that resumes it, "
                    "or choose another --name"
                )
            if args.warm_start:  # a donor study that cannot be read is said now, not in the job
                from ..tune.study.warmstart import plan

                plan(spec, args.warm_start)
            spec = _as_sweep_takes_it(spec, args)
            resources = dict(spec.resources)
            space = str(Path(args.target).absolute()) if Path(args.target).is_file() else args.target
            first = ["sweep", space, "--name", sdir.name, "--results", str(sdir.parent)]
            first += _given(args, SWEEP_OPTIONS) + common
            again = ["resume", str(sdir), *common]
            storage = first[first.index("--storage") + 1] if "--storage" in first else None
            data = args.data or spec.data.get("path")
        what, name, stage_name = f"the study {sdir.name}", sdir.name, "study"
    gpus = args.gpus_per_node
    if gpus is None:
        gpus = math.ceil(float(resources.get("gpu", 0) or 0) * (per_node or 1) - 1e-9)
    job = slurm.Job(
        nodes=args.nodes,
        gpus_per_node=gpus,
        cpus_per_node=slurm.default_cpus(resources, gpus, per_node)
        if args.cpus_per_node is None
        else args.cpus_per_node,
        time=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        setup=args.setup,
        sbatch_options=args.sbatch_option or [],
        grace=args.grace,
        max_requeues=args.max_requeues,
    )
    job.check()
    slurm.check_shared("the study directory", str(out), job.nodes)
    if storage:
        slurm.check_shared("the Ray storage", storage, job.nodes)
    slurm.check_partition(job, default_cpus=args.cpus_per_node is None)
    if job.gpus_per_node == 0 and float(resources.get("gpu", 0) or 0) > 0:
        raise FerTuneError(
            f"each trial asks for {resources['gpu']:g} GPU but --gpus-per-node is 0: give the job GPUs"
            + (", or --gpus-per-run 0" if args.final else "" if args.pbt else ", or --gpus-per-trial 0 for a CPU study")
        )
    unit = "run" if args.final else "member" if args.pbt else "trial"
    warning = slurm.check_fit(job, resources, unit)
    if warning:
        print(f"warning: {warning}")
    text = render(
        job,
        what=what,
        study=sdir,
        log_dir=out,
        first=first,
        again=again,
        name=name,
        stage=stage_name,
        storage=storage,
        data=data,
        command=shlex.join(["fer-tune", *sys.argv[1:]]) if sys.argv[1:2] == ["slurm"] else "",
    )
    out.mkdir(parents=True, exist_ok=True)
    script = out / SCRIPT
    tmp = script.with_name(script.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, script)
    what_job = (
        f"{job.nodes} node(s) x {job.cpus_per_node} CPUs"
        + (f", {job.gpus_per_node} GPU(s) each" if job.gpus_per_node else "")
        + f", --time {job.time}; at the time limit the {stage_name} is saved and the job requeued, at most "
        f"{job.max_requeues} times"
    )
    print(f"wrote {script} ({what_job})")
    usable = slurm.parse_time(job.time) - job.grace - SIGNAL_EARLY
    if usable < SHORT_ALLOCATION:
        print(
            f"warning: an allocation may be stopped {max(usable, 0)} s after it starts (--time less --grace less the "
            f"{SIGNAL_EARLY} s SLURM may signal early), and starting Ray and the driver takes about a minute of that: "
            "give a longer --time"
        )
    if not args.submit:
        print(f"submit it with: sbatch {script}")
        return 0
    job_id = slurm.submit(script)
    print(f"submitted job {job_id}")
    print(f"follow it:  squeue -j {job_id}   tail -f {out / f'slurm-{job_id}.log'}   fer-tune status {sdir}")
    print(f"afterwards: sacct -j {job_id} --format=JobID,State,Elapsed,NodeList   (scancel {job_id} stops it)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = parser_with(
        sub,
        "slurm",
        "run a study (or its final or PBT stage) as a SLURM batch job that requeues itself at its time limit",
        """
        fer-tune slurm joint --data ~/data/fer2013.csv --gpus-per-trial 0.25 --nodes 2 --gpus-per-node 4 \\
            --time 1-00:00:00 --partition gpu --setup 'source ~/fer-tune/.venv/bin/activate' --submit
        fer-tune slurm results/joint --submit            # the job that resumes an existing study
        fer-tune slurm results/joint --final --seeds 3 --gpus-per-run 1 --gpus-per-node 3 --time 12:00:00
        fer-tune slurm results/joint --pbt --top-k 4 --population 8 --epochs 60 --gpus-per-node 2 --time 12:00:00
        fer-tune slurm smoke --cpus-per-node 8 --time 30   # only write results/smoke/slurm.sbatch, to read or edit
    """,
        details="Writes RESULTS/NAME/slurm.sbatch (the final stage: RESULTS/NAME/final/slurm.sbatch, the PBT stage: "
        "RESULTS/NAME/pbt/slurm.sbatch), a commented "
        "batch script meant to be read and edited, and with --submit gives it to sbatch. The job starts Ray on its "
        "nodes, checks that every node sees the study directory and the Ray storage, and runs the driver on the "
        "first node: sweep the first time, resume once the study exists (a stage: fer-tune final or pbt, which "
        "continue themselves). GRACE seconds before the time limit it "
        "stops the study (saved, as on SIGTERM) and requeues itself until the study is finished.",
    )
    p.add_argument(
        "target",
        metavar="SPACE|results/NAME",
        help="a search space (file or shipped name) for a new study, or an existing study directory",
    )
    p.add_argument("--final", action="store_true", help="the study's final stage (fer-tune final) instead")
    p.add_argument("--pbt", action="store_true", help="the study's PBT stage (fer-tune pbt) instead")
    j = p.add_argument_group("the job")
    j.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    j.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs per node (default: 1 when a trial asks for a GPU, else 0; --pbt: its population's share of them, "
        "all members at once)",
    )
    j.add_argument(
        "--cpus-per-node",
        type=int,
        default=None,
        help="CPUs per node (default: a trial's CPUs times the trials a node's GPUs hold, or 4 trials without "
        "GPUs, or --pbt's members a node holds, plus 1 for the driver)",
    )
    j.add_argument(
        "--time",
        default="1-00:00:00",
        metavar="D-HH:MM:SS",
        help="time limit of each allocation (default 1-00:00:00); the job requeues itself at the limit",
    )
    j.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    j.add_argument("--account", default=None, help="SLURM account")
    j.add_argument("--qos", default=None, help="SLURM quality of service")
    j.add_argument(
        "--setup",
        default=None,
        metavar="COMMANDS",
        help="shell commands that prepare the nodes' environment, e.g. 'module load cuda; source "
        ".venv/bin/activate' (default: the Python running this command, by absolute path)",
    )
    j.add_argument(
        "--sbatch-option",
        action="append",
        metavar="OPTION",
        help="one more #SBATCH line, e.g. --sbatch-option=--constraint=a100 (repeatable)",
    )
    j.add_argument(
        "--grace",
        type=int,
        default=300,
        metavar="SECONDS",
        help="stop and save the study this long before the time limit (default 300)",
    )
    j.add_argument("--max-requeues", type=int, default=20, help="requeue the job at most this many times (default 20)")
    j.add_argument("--submit", action="store_true", help="submit the script with sbatch and say how to follow it")
    s = p.add_argument_group("the study (as fer-tune sweep; a new study only)")
    s.add_argument("--data", default=None, metavar="PATH", help="dataset (default: the space's, else synthetic)")
    s.add_argument("--name", default=None, help="study name (default: the space's)")
    s.add_argument("--results", default="results", help="results root (default: results)")
    s.add_argument("--storage", default=None, metavar="URI|DIR", help="Ray storage every node reaches")
    s.add_argument("--optuna-storage", default=None, metavar="URL", help="Optuna database URL or env:VAR")
    s.add_argument("--num-samples", type=int, default=None, help="number of trials")
    s.add_argument("--max-concurrent", type=int, default=None, help="at most this many trials at once")
    s.add_argument("--gpus-per-trial", type=float, default=None, help="GPU fraction per trial")
    s.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial")
    s.add_argument(
        "--warm-start",
        action="append",
        default=None,
        metavar="results/OTHER[:K]",
        help="run another study's K best configurations first (as fer-tune sweep); may be given again",
    )
    f = p.add_argument_group("the final stage (as fer-tune final; with --final)")
    f.add_argument("--trial", type=int, default=None, help="use this trial number (default: the study's best)")
    f.add_argument("--epochs", type=int, default=None, help="training epochs (with --pbt: epochs per member)")
    f.add_argument("--finetune-epochs", type=int, default=None, help="fine-tune epochs")
    f.add_argument("--finetune-lr", type=float, default=None, help="fine-tune starting lr")
    f.add_argument("--finetune-scheduler", choices=("cosine", "cosine_wr"), default=None, help="fine-tune schedule")
    f.add_argument("--finetune-on", choices=("train+val", "train"), default=None, help="fine-tune data")
    f.add_argument("--seeds", type=int, default=None, help="independent runs, in parallel")
    f.add_argument("--eval-every", type=int, default=None, help="test accuracy every N epochs")
    f.add_argument("--gpus-per-run", type=float, default=None, help="GPU fraction per seed")
    f.add_argument("--cpus-per-run", type=float, default=None, help="CPUs per seed")
    f.add_argument("--baseline", choices=BASELINES, default=None, help="also retrain the paper's recipe")
    f.add_argument("--ensemble", type=int, default=None, metavar="K", help="ensemble the K best configurations")
    f.add_argument("--from-pbt", action="store_true", default=None, help="the PBT stage's best member")
    f.add_argument("--out", default=None, help="the final stage's directory (default: STUDY/final)")
    b = p.add_argument_group("the PBT stage (as fer-tune pbt; with --pbt, and --epochs)")
    b.add_argument("--top-k", type=int, default=None, help="seed the population with the K best trials")
    b.add_argument("--population", type=int, default=None, help="members (default: K)")
    b.add_argument("--interval", type=int, default=None, help="epochs between perturbations")
    b.add_argument("--mutate", default=None, metavar="KEYS", help="keys to perturb, among lr, weight_decay, dropout")
    b.add_argument("--method", choices=("pbt", "pb2"), default=None, help="PBT (default) or PB2")
    b.add_argument("--synch", action="store_true", default=None, help="perturb the whole population at once")
    c = p.add_argument_group("all")
    c.add_argument("--mlflow", default=None, metavar="URI", help="MLflow tracking (as the driver takes it)")
    c.add_argument(
        "--force",
        action="store_true",
        help="the driver's --force: run although the study's inputs changed or its lock names another machine",
    )
    add_read_options(c)
    add_output_options(c)
    p.set_defaults(func=cmd_slurm)
