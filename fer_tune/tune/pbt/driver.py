"""Population-based training seeded by a study: `fer-tune pbt results/NAME`.

Ray's PopulationBasedTraining (Jaderberg et al. 2017, "Population Based Training of Neural Networks") and PB2
(Parker-Holder et al. 2020, "Provably Efficient Online Hyperparameter Optimization with Population-Based Bandits")
cannot run beside a search algorithm, so the study's Optuna search cannot drive them. This second stage starts a
population from the study's top-K configurations instead (Tune's BasicVariantGenerator with points_to_evaluate, which
the PBT schedulers accept) and trains it for --epochs; every --interval epochs a member in the bottom quarter takes
the weights of one in the top quarter and goes on with perturbed lr / weight_decay / dropout (PBT: each x0.8 or
x1.2, or resampled from its range with probability 0.25; PB2: chosen by a Gaussian-process bandit).

The members train with scheduler=constant: PBT's mutations are the lr schedule (the configs' own schedulers would
fight them, and a plateau or cosine state cloned into another member means nothing there).

results/NAME/pbt/
    pbt.json         what was launched: the settings, the top-K configurations, the population's first configs
    tune/            Ray's experiment (one trial per member; checkpoints hold state.pt and lineage.json)
    population.csv   every member's every epoch (also while running or after an interruption)
    lineage.json     every clone (who took whose weights at which epoch, the values before and after) and each
                     member's schedule
    metrics.json     the population at the end and the best member: its schedule, its test metrics
    best/            the best member evaluated on the test split with TenCrop (metrics.json, confusion_last.csv,
                     saliency) and exported; model.pt, .pt2, .onnx, .json are copied to pbt/
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from ray.tune import Callback

from ...common import FerTuneError, write_json
from ...schedule import MUTABLE
from ..runtime import internals, preflight, signals, stage
from ..runtime.checkpoints import pruner
from ..runtime.layout import experiment_trial_states
from ..runtime.lock import acquire
from ..runtime.session import ray_log_to, ray_session, say_ray_log, set_output
from ..study.record import StudyRecord, read_study, reopen, study_spec
from .outputs import evaluate_best, population_progress, write_population
from .read import PBT_DIR, PBT_FILE, PbtRecord, cadence, member_number
from .trial import ORIGIN, member_trial

log = logging.getLogger(__name__)

METHODS = ("pbt", "pb2")
DEFAULTS = {
    "top_k": 4,
    "population": None,
    "epochs": None,
    "interval": None,
    "mutate": ",".join(MUTABLE),
    "synch": False,
}
# ranges of the mutated keys a study does not search (a searched key takes the study's range)
RANGES = {"lr": (1e-4, 0.1, True), "weight_decay": (1e-6, 1e-2, True), "dropout": (0.0, 0.6, False)}


class Clip:
    """PBT's explore step, bounded: x0.8 / x1.2 may leave a key's range (a dropout of 1 or more); clip it back."""

    def __init__(self, bounds: dict):
        self.bounds = bounds

    def __call__(self, config: dict) -> dict:
        for k, (low, high) in self.bounds.items():
            config[k] = min(max(float(config[k]), low), high)
        return config


def settings_of(given: dict, spec_epochs: int) -> dict:
    """The stage's settings from the options given (None = default), checked; FerTuneError for a bad one."""
    s = {k: v if (v := given.get(k)) is not None else d for k, d in DEFAULTS.items()}
    s["method"] = given.get("method") or "pbt"
    s["epochs"] = spec_epochs if s["epochs"] is None else s["epochs"]
    s["population"] = s["top_k"] if s["population"] is None else s["population"]
    s["interval"] = max(1, s["epochs"] // 10) if s["interval"] is None else s["interval"]
    for k in ("top_k", "population", "epochs", "interval"):
        if s[k] < 1:
            raise FerTuneError(f"--{k.replace('_', '-')} must be >= 1, got {s[k]}")
    if s["population"] < 2:
        raise FerTuneError("--population must be >= 2: PBT exploits the better members of a population")
    if s["population"] < s["top_k"]:
        raise FerTuneError(f"--population {s['population']} is smaller than --top-k {s['top_k']}")
    if s["interval"] > s["epochs"]:
        raise FerTuneError(f"--interval {s['interval']} is longer than --epochs {s['epochs']}: no member would change")
    keys = [k.strip() for k in str(s["mutate"]).split(",") if k.strip()]
    unknown = [k for k in keys if k not in MUTABLE]
    if unknown or not keys:
        raise FerTuneError(f"--mutate {s['mutate']}: give keys among {', '.join(MUTABLE)}, comma-separated")
    s["mutate"] = sorted(set(keys), key=MUTABLE.index)
    if s["method"] not in METHODS:
        raise FerTuneError(f"--method {s['method']}: one of {', '.join(METHODS)}")
    if s["method"] == "pb2":
        from ray.tune.schedulers import pb2

        if not pb2.has_sklearn:
            raise FerTuneError("--method pb2 needs scikit-learn (pip install -e '.[pb2]'); --method pbt does not")
    return s


def mutations(spec: dict, bases: list[dict], keys: list[str]) -> dict:
    """{key: [low, high, log]}: the study's range of each mutated key (over the parameters that set it), else
    RANGES, widened to hold the top-K configurations' values."""
    out = {}
    for k in keys:
        params = [p for n, p in spec["space"].items() if (p.get("key") or n) == k and p.get("type") == "float"]
        low, high, logs = RANGES[k]
        if params:
            low, high = min(p["low"] for p in params), max(p["high"] for p in params)
            logs = any(p.get("log") for p in params)
        vals = [float(b[k]) for b in bases]
        low, high = min(low, *vals), max(high, *vals)
        if logs and low <= 0:
            low = min([v for v in vals if v > 0] + [RANGES[k][0]])
        out[k] = [low, high, bool(logs)]
    return out


def first_points(bases: list[dict], population: int, keys: list[str], ranges: dict, seed: int) -> list[dict]:
    """The population's first configs: the top-K in turn; members after the K-th with each mutated value x0.8 or
    x1.2 (as PBT's explore step), so that no two start alike."""
    rng = random.Random(seed)
    points = []
    for m in range(population):
        o = m % len(bases)
        point = {ORIGIN: o, **{k: float(bases[o][k]) for k in keys}}
        if m >= len(bases):
            for k in keys:
                low, high, _ = ranges[k]
                point[k] = min(max(point[k] * rng.choice((0.8, 1.2)), low), high)
        points.append(point)
    return points


def _domains(ranges: dict) -> dict:
    from ray import tune

    return {k: (tune.loguniform if logs else tune.uniform)(lo, hi) for k, (lo, hi, logs) in ranges.items()}


def param_space(rec: PbtRecord) -> dict:
    """What the members' configs hold (every member's first config is one of rec["points"])."""
    from ray import tune

    return {ORIGIN: tune.randint(0, len(rec["bases"])), **_domains(rec["mutations"])}


class TakeTurns:
    """Mixed into Ray's PBT and PB2 schedulers: of the members waiting with the same time, the one that has waited
    longest runs next. Ray gives each member a fair share of the trial slots by the time (epoch) it last reported
    at an interval, and breaks ties by the order of its trials. A member that has just taken a donor's weights has
    the donor's time, so where it comes first it runs again before the donor can go on, and if it stays at the
    bottom it takes the same weights again, for ever (seen where fewer members run at once than the population
    has, after a continued stage had reordered the trials)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.turns: dict[str, int] = {}  # trial id -> when it was last chosen to run
        self.turn = 0

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        chosen = super().choose_trial_to_run(tune_controller)  # type: ignore[misc]
        if chosen is None:
            return None
        at = internals.pbt_train_time(self, chosen)
        tied = [
            t
            for t in tune_controller.get_trials()
            if t.status in ("PENDING", "PAUSED") and internals.pbt_train_time(self, t) == at
        ]
        chosen = min(tied, key=lambda t: self.turns.get(t.trial_id, -1))
        self.turn += 1
        self.turns[chosen.trial_id] = self.turn
        return chosen


def make_scheduler(rec: PbtRecord) -> Any:
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2

    s, ranges = rec["settings"], rec["mutations"]
    common = {
        "time_attr": "epoch",
        "metric": rec["metric"],
        "mode": rec["mode"],
        "perturbation_interval": s["interval"],
        "synch": bool(s.get("synch")),  # a stage of an earlier release has no such setting: asynchronous
    }
    clip = Clip({k: (lo, hi) for k, (lo, hi, _) in ranges.items()})
    if s["method"] == "pb2":
        return type("FairPB2", (TakeTurns, PB2), {})(
            **common, hyperparam_bounds={k: [lo, hi] for k, (lo, hi, _) in ranges.items()}, custom_explore_fn=clip
        )
    fair = type("FairPBT", (TakeTurns, PopulationBasedTraining), {})
    return fair(**common, hyperparam_mutations=_domains(ranges), custom_explore_fn=clip)


def top_trials(sdir: Path, record: StudyRecord, spec: Any, k: int) -> list[dict]:
    """The study's K best finished trials by its metric and mode, each with its full config (trials.best_trial)."""
    from ..study.warmstart import best_configs

    tops = best_configs(sdir, record, spec, k)
    if len(tops) < k:
        raise FerTuneError(
            f"{sdir}: --top-k {k} needs {k} finished trials with a {spec.metric}, and the study has {len(tops)}"
            + ("; run or resume the sweep first" if not tops else f"; pass --top-k {len(tops)} or less")
        )
    return tops


def run_pbt(study: str, opts: stage.RunOptions, *, given: dict) -> int:
    """`fer-tune pbt`: start, continue or report the study's PBT stage (holding its directory's lock)."""
    sdir = Path(study).resolve()
    record = read_study(sdir)
    out = sdir / PBT_DIR
    rec = stage.read_record(out / PBT_FILE, "the PBT stage")
    settings = settings_of(given, record["spec"]["max_epochs"])  # options are checked before anything runs
    if rec is not None:
        recorded = rec["given"]

        def said(k: str) -> str:
            return f"recorded: {recorded[k]}" if k in recorded else "it was started without it"

        stage.refuse_other_settings(
            out, "a PBT stage", given, recorded, said, "or remove the directory to start another"
        )
    tops = None
    if rec is None:  # the study's top trials, before any data is loaded or a directory made
        stage.refuse_while_the_study_runs(
            sdir, "its top trials are not settled yet: start the PBT stage when it has finished"
        )
        spec = study_spec(sdir, record)
        tops = top_trials(sdir, record, spec, settings["top_k"])
    with acquire(out, what="the PBT stage", force=opts.force, create=True):
        record, spec, data = reopen(sdir, opts.force, opts.loader)
        if tops is not None:
            rec = new_record(sdir, record, spec, data, settings, given, tops)
        elif (out / "metrics.json").is_file():
            log.info("%s: the PBT stage is complete", out)
            return 0
        else:
            log.info("continuing the PBT stage in %s from its last checkpoints", out)
        return _run(out, rec, data, opts)


def new_record(sdir: Path, record: StudyRecord, spec: Any, data: Any, s: dict, given: dict, tops: list[dict]) -> dict:
    bases = [{**t["config"], "epochs": s["epochs"], "scheduler": "constant"} for t in tops]
    ranges = mutations(record["spec"], bases, s["mutate"])
    return {
        **stage.stage_record(sdir, record, data, dict(spec.resources), PBT_DIR, sdir / PBT_DIR),
        "given": {k: v for k, v in given.items() if v is not None},
        "settings": s,
        "metric": spec.metric,
        "mode": spec.mode,
        "members": [
            {"trial": {k: t[k] for k in ("number", "ray_trial_id", "metric", "value", "epoch", "params")}} for t in tops
        ],
        "bases": bases,
        "mutations": ranges,
        "points": first_points(bases, s["population"], s["mutate"], ranges, spec.seed),
        "seed": spec.seed,
    }


# a member restarted this often in a row from one checkpoint to the same epoch is stuck (a member retried after a
# failure repeats an epoch at most FAILURES + 1 times)
REPEATS = stage.FAILURES + 3


class StuckGuard(Callback):
    """Stops the stage as Ctrl-C does (Tune's state saved, every member resumable) when Ray's PBT scheduler goes
    round in circles: it hands a member the same donor's checkpoint again and again, the member trains the same
    epoch each time, and the rest of the population waits. Seen with a continued PB2 stage whose three members
    shared one trial slot; it would burn a whole allocation. `stuck`: what it saw, or ""."""

    def __init__(self) -> None:
        self.stuck = ""
        self._last: dict[str, tuple] = {}  # trial id -> ((since, start_epoch, epoch), times in a row)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        key = (result.get("since", ""), result.get("start_epoch"), result.get("epoch"))
        seen, times = self._last.get(trial.trial_id, (None, 0))
        times = times + 1 if key == seen else 1
        self._last[trial.trial_id] = (key, times)
        if times >= REPEATS and not self.stuck:
            since, start, epoch = key
            donor, at = since.split("@") if since else (trial.trial_id, start)
            self.stuck = (
                f"member {member_number(trial.trial_id)} was restarted {times} times in a row from member "
                f"{member_number(donor)}'s checkpoint of epoch {at} and trained epoch {epoch} each time: Ray's PBT "
                "scheduler made no progress, so the stage was stopped (seen where fewer members run at once than the "
                "population has; more --num-cpus or a cluster run them all)"
            )
            signals.interrupt()


_FIX = "the PBT stage runs its members with the study's resources per trial: run it where they fit (--address)"


def _run(out: Path, rec: PbtRecord, data: Any, opts: stage.RunOptions) -> int:
    """Run (or continue) the stage's Ray experiment, then evaluate and export the best member."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    new = not (out / PBT_FILE).is_file()
    s = rec["settings"]
    output = opts.output
    with ray_session(opts.address, num_cpus=opts.num_cpus, output=output):
        preflight.check_run(rec["ray_storage"], opts.address, rec["resources"], _FIX)
        if new:
            tops = ", ".join(f"{m['trial']['number']}" for m in rec["members"])
            log.info(
                "PBT stage of %s (%s): %d members from trials %s, %d epochs, perturbing %s %s "
                "(scheduler constant); results in %s",
                rec["study"],
                s["method"].upper(),
                s["population"],
                tops,
                s["epochs"],
                ", ".join(s["mutate"]),
                cadence(s),
                out,
            )
            write_json(out / PBT_FILE, rec)
        ray_log_to(out / "ray.log")
        res = rec["resources"]
        guard, scheduler = StuckGuard(), make_scheduler(rec)
        fn = stage.trainable(
            member_trial,
            res,
            bases=[{**b, "threads": b.get("threads") or stage.threads(res)} for b in rec["bases"]],
            data={k: data.arrays(k) for k in ("train", "val")},
            weight=stage.weight(res),
            mutate=s["mutate"],
        )

        def new_tuner() -> Any:
            return tune.Tuner(
                fn,
                param_space=param_space(rec),
                tune_config=tune.TuneConfig(
                    search_alg=BasicVariantGenerator(points_to_evaluate=rec["points"]),
                    scheduler=scheduler,
                    num_samples=s["population"],
                    reuse_actors=True,
                ),
                # a donor's checkpoint must outlive the interval until a member clones it
                run_config=stage.run_config(
                    "tune",
                    rec["ray_storage"],
                    output,
                    [pruner(latest=s["interval"] + 2, score=rec["metric"], mode=rec["mode"])],
                ),
            )

        tuner, exp = stage.stage_tuner(rec, fn, new_tuner, s["population"])
        config = internals.tuner_tune_config(tuner)
        if config is not None:  # a continued stage too (Tune restores the scheduler of an earlier release)
            config.scheduler = scheduler
        set_output(tuner, output, population_progress(rec), exp, guards=(guard,))
        random.seed(rec["seed"])  # PBT's choices of donors and perturbations (their order still follows the results)
        grid = stage.fit_stage(tuner, rec, out / PBT_FILE)
        members = write_population(out, exp, rec)
        say_ray_log()
        states = experiment_trial_states(exp).values()
        if guard.stuck:
            log.error("%s", guard.stuck)
        if guard.stuck or grid is None or signals.received() or any(s not in ("TERMINATED", "ERROR") for s in states):
            code = stage.stopped("PBT stage", f"fer-tune pbt {rec['study_dir']}")
            return 1 if guard.stuck else code
        return evaluate_best(out, rec, grid, members, data)
