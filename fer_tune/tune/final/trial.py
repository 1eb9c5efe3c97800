"""One seed of the final stage inside Ray Tune: the thin Ray wrapper of fer_tune.recipe.run_seed. Every save is a
`tune.report` with a checkpoint (progress.json, state.pt, best.pt / last.pt, and the finished run's outputs);
`tune.get_checkpoint` hands the last one back to continue, falling back to an older intact one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ...recipe import SeedState, run_seed
from ..runtime.checkpoints import restore, scalars
from ..runtime.trial import device_seconds, report, where
from .ensemble import WINNER, is_member

SNAPSHOT_KEEP = 1e6  # a checkpoint's `keep` from here on: an --eval-every snapshot or the finished run (kept)


def _keep(step: int | None, pinned: bool, done: bool) -> float:
    """A checkpoint's `keep` (its order; pinned ones from SNAPSHOT_KEEP up are never pruned)."""
    if done:
        return 2 * SNAPSHOT_KEEP
    if step is None:
        return -1.0
    return SNAPSHOT_KEEP + step if pinned else float(step)


def progress_order(meta: dict) -> float:
    """How far a final-stage checkpoint got (its `keep` without the snapshot mark; the finished run last)."""
    keep = float(meta.get("keep", -1))
    return keep - SNAPSHOT_KEEP if SNAPSHOT_KEEP <= keep < 2 * SNAPSHOT_KEEP else keep


def _load_state(d: Path) -> SeedState:
    from ...models import load_tensor_file

    weights = {
        k: load_tensor_file(d / f"{k}.pt", "checkpoint")["model"] for k in ("best", "last") if (d / f"{k}.pt").exists()
    }
    fit_state = load_tensor_file(d / "state.pt", "checkpoint") if (d / "state.pt").exists() else None
    return SeedState.restore(json.loads((d / "progress.json").read_text()), weights, fit_state)


def seed_trial(
    config: dict,
    *,
    base: dict,
    finetune: dict,
    data: dict,
    eval_every: int,
    weight: float,
    arms: dict | None = None,
    track_crops: str | None = None,
    provenance: dict | None = None,
    schedules: dict | None = None,
    ensemble: bool = False,
) -> None:
    """`arms`: the TrainConfig of every arm but the winner's (`base`): an ensemble's other members (exported, as
    the winner) and the baselines (measured only); `schedules`: {arm: a PBT member's schedule to replay};
    `ensemble`: the winner and the members keep their test logits."""
    from ray import tune

    from ...config import TrainConfig
    from ...device import select_device
    from ...train import save_checkpoint

    seed, arm = int(config["seed"]), config.get("arm", WINNER)
    member = arm == WINNER or is_member(arm)  # exported, and in an ensemble (a baseline is measured only)
    cfg = TrainConfig.from_dict({**(base if arm == WINNER else (arms or {})[arm]), "seed": seed}, source="final config")
    device = select_device()
    ckpt = tune.get_checkpoint()
    state = (restore(ckpt, _load_state, order=progress_order) if ckpt is not None else None) or SeedState(seed, arm)
    about = {**where(device), "resumed_at": state.epochs_done()}

    def save(
        seed_state: SeedState, metrics: dict, *, step: int | None, pinned: bool, outputs: Path | None = None
    ) -> None:
        out = scalars(metrics)
        out.update(seed=seed, arm=arm, phase=seed_state.phase, keep=_keep(step, pinned, outputs is not None), **about)
        out["device_seconds"] = device_seconds(weight, seed_state.train_history, seed_state.finetune_history)

        def write(d: Path) -> None:
            (d / "progress.json").write_text(json.dumps(seed_state.progress()))
            if seed_state.fit_state is not None and step is not None:
                save_checkpoint(seed_state.fit_state, d / "state.pt")
            for k, sd in seed_state.weights.items():
                if sd is not None:
                    save_checkpoint({"model": sd}, d / f"{k}.pt")
            if outputs is not None:
                shutil.copytree(outputs, d / "outputs")

        report(out, write)

    run_seed(
        cfg,
        finetune,
        data,
        state,
        save=save,
        device=device,
        eval_every=eval_every,
        track_crops=track_crops,
        export=member,
        provenance=provenance,
        schedule=(schedules or {}).get(arm),
        keep_logits=ensemble and member,
    )
