"""The final stage: a study's best configuration retrained from scratch, fine-tuned as the paper does, evaluated
with TenCrop on the test split; K seeds in parallel on Ray, resumable like a study.

results/NAME/final/
    final.json    what was launched: the trial, its config, the fine-tune settings, the seeds
    tune/         Ray's experiment, one trial per seed; checkpoints: the latest, one every --eval-every epochs
                  and the finished one (each holds progress.json, state.pt, best.pt = the best-val weights)
    seed-S/       per seed: metrics.json, confusion_{last,best_val,finetuned}.csv, saliency.png/.npz,
                  model.pt (state_dict + config), model.pt2 (torch.export program), model.onnx (checked
                  with onnxruntime), model.json (the model card; fer_tune.export)
    metrics.json  per seed and mean +- std over seeds (written when every seed has finished)
    history.csv   every seed's train and fine-tune epochs (also while running or after an interruption)
    model.pt, .pt2, .onnx, .json  the fine-tuned model of the seed with the best validation accuracy

Each seed runs fer_tune.recipe.run_seed through its Ray adapter (fer_tune.tune.final.trial.seed_trial);
fer_tune.tune.final.outputs collects what the seeds leave behind. This module is the driver.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...common import NAME_RULE, FerTuneError, is_plain_name, write_json
from ...config import TrainConfig, checkpoint_bytes
from ...recipe import FINAL_DEFAULTS, TEST_CROPS, baseline_config, check_final_options
from ..mlflow.final import catch_up_final, track_final
from ..mlflow.tracking import check as check_tracking
from ..pbt.read import REPLAY_DIR, replay_choice, replay_choices
from ..runtime import preflight, stage
from ..runtime.checkpoints import pruner
from ..runtime.lock import acquire
from ..runtime.progress import params_line
from ..runtime.session import ray_log_to, ray_session, say_ray_log, set_output
from ..study.outputs import best_trial
from ..study.record import StudyRecord, read_study, reopen
from ..study.warmstart import best_configs
from .ensemble import WINNER, describe_members, member_record
from .outputs import FinalRecord, collect, final_progress, run_count, write_history
from .trial import SNAPSHOT_KEEP, seed_trial

log = logging.getLogger(__name__)

FINAL_FILE = "final.json"


def _count(n: int, what: str) -> str:
    """`1 epoch`, `3 epochs`."""
    return f"{n} {what}{'' if n == 1 else 's'}"


def _settings(out: Path, given: dict) -> dict | None:
    """The recorded settings of an existing final stage; refuses when given options contradict them."""
    rec = stage.read_record(out / FINAL_FILE, "the final stage")
    if rec is None:
        return None

    def recorded(k: str) -> str:
        if rec["settings"].get(k) is not None:
            return f"recorded: {rec['settings'][k]}"
        if k == "trial":
            return f"it retrains trial {rec['trial']['number']}, the study's best"
        return "it was started without it"

    stage.refuse_other_settings(
        out, "a final stage", given, rec["settings"], recorded, "or pass --out DIR for a new one"
    )
    return rec


def run_final(
    study: str,
    opts: stage.RunOptions,
    *,
    trial: int | None,
    out: str | None,
    given: dict,
    gpus: float | None,
    cpus: float | None = None,
) -> int:
    """`fer-tune final`: start, continue or report a study's final stage (holding the lock of its directory).
    ``given``: the options the user passed (None = not given) among FINAL_DEFAULTS' keys; ``opts.mlflow``: the
    MLflow tracking URI (fer_tune.tune.mlflow.tracking), default the one the stage recorded, else the study's."""
    sdir = Path(study).resolve()
    out_p = Path(out).resolve() if out else sdir / (REPLAY_DIR if given.get("from_pbt") else "final")
    check_final_options(given, trial=trial, gpus=gpus, cpus=cpus)
    record = read_study(sdir)
    _check_out(out_p, sdir, record)
    with acquire(out_p, what="the final stage", force=opts.force, create=True):
        return _final(sdir, out_p, opts, trial=trial, given=given, gpus=gpus, cpus=cpus)


def _members(sdir: Path, record: StudyRecord, spec: Any, settings: dict) -> list[dict]:
    """An ensemble's members, best first (the winner first): the study's `ensemble` best distinct configurations,
    or with `from_pbt` the PBT stage's best members; [] without --ensemble; refused when there are fewer."""
    k = settings["ensemble"]
    if k <= 1:
        return []
    picks = replay_choices(sdir, k) if settings["from_pbt"] else best_configs(sdir, record, spec, k)
    if len(picks) < k:
        where = (
            "members of its PBT stage that trained all its epochs"
            if settings["from_pbt"]
            else "finished trial(s) with distinct configurations" + (" on its Pareto front" if spec.multi else "")
        )
        raise FerTuneError(
            f"--ensemble {k}: {sdir} has {len(picks)} {where}; give --ensemble {len(picks)} or fewer"
            + ("" if settings["from_pbt"] else ", or extend the study (fer-tune extend)")
        )
    return picks


def _check_out(out: Path, sdir: Path, record: StudyRecord) -> None:
    """A final stage's directory: not the study's own, nor inside one of its Ray experiments; its name is a plain
    name (it names the final stage's Ray experiment beside the study's in a shared Ray storage)."""
    runs = {r["dir"] for r in record["runs"]}
    inside = out.is_relative_to(sdir) and out != sdir and out.relative_to(sdir).parts[0] in runs
    if out == sdir or sdir.is_relative_to(out) or inside:
        raise FerTuneError(
            f"--out {out}: a final stage needs a directory of its own, not the study directory or "
            f"one of its Ray experiments ({', '.join(sorted(runs))}); the default is {sdir / 'final'}"
        )
    if not is_plain_name(out.name):
        raise FerTuneError(
            f"--out {out}: the directory's name {out.name!r} names the final stage's Ray experiment: {NAME_RULE}"
        )
    if record.get("ray_storage") and out.name in runs:
        raise FerTuneError(
            f"--out {out}: its name {out.name!r} is taken by the study's own Ray experiment in "
            f"{record['ray_storage']}; choose another directory name"
        )


def _final(
    sdir: Path,
    out_p: Path,
    opts: stage.RunOptions,
    *,
    trial: int | None,
    given: dict,
    gpus: float | None,
    cpus: float | None,
) -> int:
    record, spec, data = reopen(sdir, opts.force, opts.loader)
    # a trial the study does not have is refused as that, whatever the final stage in OUT holds
    chosen = best_trial(sdir, record, spec, trial) if trial is not None else None
    rec = _settings(out_p, {**given, "trial": trial})
    if rec is None and trial is None and not given.get("from_pbt"):
        stage.refuse_while_the_study_runs(
            sdir,
            "its best trial is not settled yet: start the final stage when it has finished, or pick a trial "
            "with --trial N",
        )
    announce, complete = "", False
    if rec is None:
        settings = {k: (given.get(k) if given.get(k) is not None else v) for k, v in FINAL_DEFAULTS.items()}
        settings["trial"] = trial
        picks = _members(sdir, record, spec, settings)
        best = (
            replay_choice(sdir)
            if settings["from_pbt"]
            else chosen or (picks[0] if picks else best_trial(sdir, record, spec, None))
        )
        if settings["from_pbt"] and given.get("epochs") is None:  # the PBT stage's epochs, which its schedule spans
            settings["epochs"] = best["epochs"]
        settings["eval_every"] = min(settings["eval_every"], settings["epochs"])
        config = {**best["config"], "epochs": settings["epochs"]}
        seeds = [int(config["seed"]) + i for i in range(settings["seeds"])]
        res = spec.resources
        resources = {"cpu": res["cpu"] if cpus is None else cpus, "gpu": res["gpu"] if gpus is None else gpus}
        rec = {
            **stage.stage_record(sdir, record, data, resources, out_p.name, out_p),
            "trial": {k: best[k] for k in ("number", "ray_trial_id", "metric", "value", "epoch", "params")},
            "config": config,
            "settings": settings,
            "finetune": {
                "epochs": settings["finetune_epochs"],
                "lr": settings["finetune_lr"],
                "scheduler": settings["finetune_scheduler"],
                "on": settings["finetune_on"],
            },
            "seeds": seeds,
            "eval_every": settings["eval_every"],
            "track_crops": TEST_CROPS,
        }
        if picks:
            rec["members"] = [member_record(i, p, settings["epochs"]) for i, p in enumerate(picks[1:], 2)]
        for m, p in zip(rec.get("members", []), picks[1:]):
            if "schedule" in p:  # a PBT member's, as the winner's below
                m["schedule"] = {e: v for e, v in p["schedule"].items() if e <= settings["epochs"]}
        if settings["from_pbt"]:  # the member's schedule (a longer run keeps its last values)
            rec["schedule"] = {e: v for e, v in best["schedule"].items() if e <= settings["epochs"]}
        if settings["baseline"]:
            rec["baselines"] = {settings["baseline"]: baseline_config(config, settings["baseline"])}
        from ...config import TrainConfig

        TrainConfig.from_dict(
            {
                **config,
                "epochs": settings["finetune_epochs"],
                "lr": settings["finetune_lr"],
                "scheduler": settings["finetune_scheduler"],
            },
            source="fine-tune settings",
        )
        announce = (
            f"final stage of {record['name']}: trial {best['number']} ({spec.metric} {best['value']:.2f}"
            + (", the Pareto front's best; another with --trial N" if spec.multi and trial is None else "")
            + f") with {params_line(best['params'])}; {_count(settings['epochs'], 'epoch')} + "
            f"{_count(settings['finetune_epochs'], 'fine-tune epoch')} ({settings['finetune_scheduler']} from lr "
            f"{settings['finetune_lr']:g} on {settings['finetune_on']}), {_count(len(seeds), 'seed')} "
            f"({', '.join(map(str, seeds))})"
            + (
                f"; beside it the {settings['baseline']} recipe with the same epochs, fine-tune and seeds"
                if settings["baseline"]
                else ""
            )
            + (
                f"; an ensemble of the {len(picks)} best configurations, with {describe_members(rec['members'])}"
                if picks
                else ""
            )
            + f"; results in {out_p}"
        )
        if settings["from_pbt"]:
            announce += f"; the schedule of the PBT stage's best member {best['params']['pbt_member']}: " + ", ".join(
                f"from epoch {e} {v}" for e, v in sorted(rec["schedule"].items())
            )
    elif any(v is not None and v != rec["resources"][k] for k, v in (("cpu", cpus), ("gpu", gpus))):
        raise FerTuneError(
            f"{out_p} already holds a final stage that runs with {rec['resources']['cpu']:g} CPU and "
            f"{rec['resources']['gpu']:g} GPU per run; it keeps them. Run it again without "
            "--cpus-per-run / --gpus-per-run, or pass --out DIR for a new one."
        )
    elif (out_p / "metrics.json").exists():
        log.info("%s: the final stage is complete", out_p)
        complete = True
    else:
        log.info("continuing the final stage in %s from its last checkpoints", out_p)
    ref = check_tracking(opts.mlflow, record["name"], rec.get("mlflow", record.get("mlflow")))
    if complete:  # MLflow gets what it lacks of it
        if ref != rec.get("mlflow"):
            rec["mlflow"] = ref
            write_json(out_p / FINAL_FILE, rec)
        catch_up_final(out_p, rec)
        return 0
    rec["mlflow"] = ref
    return _run_final(out_p, rec, data, opts, announce=announce)


_FINAL_FIX = (
    "start the final stage with --cpus-per-run N and --gpus-per-run F that fit it (--gpus-per-run 0 on a "
    "machine without a GPU), or run it on a Ray cluster with --address"
)
_CONTINUE_FIX = (
    "the final stage was started with these resources per run: continue it on a Ray cluster that has "
    "them (--address), or here with --num-cpus N to let Ray count more CPUs than it found; or start a "
    "new one with --out DIR and --cpus-per-run / --gpus-per-run"
)


def _run_final(out: Path, rec: FinalRecord, data: Any, opts: stage.RunOptions, *, announce: str = "") -> int:
    """Run (or continue) the final stage's Ray experiment; `announce`: a new stage's launch line (said and
    final.json written once Ray has accepted the runs: a refused stage leaves nothing behind)."""
    from ray import tune

    new = bool(announce)

    output = opts.output
    with ray_session(opts.address, num_cpus=opts.num_cpus, output=output):
        preflight.check_run(
            rec["ray_storage"], opts.address, rec["resources"], _FINAL_FIX if new else _CONTINUE_FIX, what="run"
        )
        runs = run_count(rec)
        kept = 3 + rec["config"]["epochs"] // max(1, rec["eval_every"]) + 2  # latest, snapshots, fine-tune start, end
        per = checkpoint_bytes(TrainConfig.from_dict(rec["config"]))
        preflight.check_free_space(
            [str(out), rec["ray_storage"]],
            runs * kept * per,
            f"{runs} run(s) x {kept} checkpoints of {per / 2**20:.0f} MiB: the latest 3, the evaluation snapshots, "
            "the fine-tune's start and end",
        )
        if new:
            log.info("%s", announce)
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / FINAL_FILE, rec)
        ray_log_to(out / "ray.log")
        res = rec["resources"]
        base = {**rec["config"], "threads": rec["config"].get("threads") or stage.threads(res)}
        configs = {**{m["arm"]: m["config"] for m in rec.get("members", [])}, **rec.get("baselines", {})}
        arms = {k: {**c, "threads": c.get("threads") or stage.threads(res)} for k, c in configs.items()}
        fn = stage.trainable(
            seed_trial,
            res,
            base=base,
            finetune=rec["finetune"],
            data={s: data.arrays(s) for s in ("train", "val", "test")},
            eval_every=rec["eval_every"],
            weight=stage.weight(res),
            arms=arms,
            track_crops=rec.get("track_crops"),
            provenance={"data": data.describe(), "study": rec["study"], "trial": rec["trial"]},
            schedules={WINNER: rec.get("schedule"), **{m["arm"]: m.get("schedule") for m in rec.get("members", [])}},
            ensemble=bool(rec.get("members")),
        )

        def new_tuner() -> Any:
            return tune.Tuner(
                fn,
                param_space={
                    "seed": tune.grid_search(rec["seeds"]),
                    **({"arm": tune.grid_search([WINNER, *arms])} if arms else {}),
                },
                # a run after another in the same trial process (fit seeds all it draws: the same results)
                tune_config=tune.TuneConfig(reuse_actors=True),
                # Tune deletes no checkpoint; kept: the latest 3, the --eval-every snapshots, the finished one
                run_config=stage.run_config(
                    "tune",
                    rec["ray_storage"],
                    output,
                    [pruner(latest=3, pinned=lambda m: m.get("keep", 0) >= SNAPSHOT_KEEP)],
                ),
            )

        tuner, exp = stage.stage_tuner(rec, fn, new_tuner, runs)
        set_output(tuner, output, final_progress(rec), exp)
        tracking = track_final(tuner, out, rec)
        grid = stage.fit_stage(tuner, rec, out / FINAL_FILE)
        rows = write_history(out, exp)
        say_ray_log()
        done = collect(out, rec, grid, data) if grid is not None else None
        if tracking is not None:
            tracking.finish(done, rows)
        if done is None:
            default = out == Path(rec["study_dir"]) / "final"
            return stage.stopped(
                "final stage", f"fer-tune final {rec['study_dir']}" + ("" if default else f" --out {out}")
            )
        return 0 if all(s["status"] == "complete" for s in done["seeds"]) else 1
