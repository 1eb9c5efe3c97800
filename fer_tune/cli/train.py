"""`fer-tune models | train | evaluate`: one run without Ray."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

from ..common import FerTuneError, code_revision, write_json
from .common import add_data_options, load_data, log, parser_with

# keys a resumed run may change: they do not alter the model, optimizer or data the checkpoint was made with
RESUME_CHANGEABLE = {"epochs", "threads", "eval_batch_size"}


def run_environment(device: Any) -> dict:
    import numpy
    import torch
    import torchvision

    from .. import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "fer_tune": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "code": code_revision(),
    }


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import model_table

    table = model_table()
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        print(f"{'model':<18}{'parameters':>14}")
        for row in table:
            print(f"{row['name']:<18}{row['params']:>14,}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import TrainConfig
    from ..device import precision, precision_name, select_device
    from ..evaluate import evaluate_model, format_report, saliency_sample
    from ..observers import ProgressBar
    from ..train import Take, fit, load_checkpoint, model_from_checkpoint, save_checkpoint

    out = Path(args.out)
    last, best_path, metrics_path = out / "last.pt", out / "best.pt", out / "metrics.json"
    checkpoint = None
    if args.resume:
        if not last.is_file():
            raise FerTuneError(f"--resume: {last} does not exist; there is nothing to resume in {out}")
        checkpoint = load_checkpoint(last)
        cfg = TrainConfig.from_dict(checkpoint["config"], source=str(last))
        if args.config:
            raise FerTuneError("--resume continues the run with its saved config; use --set to change keys")
        cfg = cfg.with_overrides(args.set or [])
        changed = sorted(k for k, v in cfg.to_dict().items() if checkpoint["config"].get(k) != v)
        if set(changed) - RESUME_CHANGEABLE:
            raise FerTuneError(
                f"--resume: {', '.join(changed)} cannot change in a resumed run (only "
                f"{', '.join(sorted(RESUME_CHANGEABLE))} can); start a new run with another --out"
            )
        if "epochs" in changed and cfg.scheduler in ("cosine", "onecycle"):
            raise FerTuneError(
                f"--resume: scheduler {cfg.scheduler} shapes its whole schedule over the "
                f"{checkpoint['config']['epochs']} epochs it was started with, so epochs cannot "
                "change; train a fine-tune run from best.pt instead (--set weights=...)"
            )
    else:
        if metrics_path.exists() or last.exists():
            raise FerTuneError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        cfg = TrainConfig.load(args.config) if args.config else TrainConfig()
        cfg = cfg.with_overrides(args.set or [])
        if args.protocol:
            cfg = cfg.replace(protocol=args.protocol)
    data = load_data(args, cfg.protocol)
    device = select_device(args.device)
    env = run_environment(device)
    record = {
        "config": cfg.to_dict(),
        "protocol": data.protocol,
        "data": data.describe(),
        "environment": env,
        "precision": precision_name(precision(device, cfg.amp)[0]),
        "seed": cfg.seed,
        "status": "running",
        "message": "",
        "history": [],
        "best": {},
        "test": {},
    }
    if checkpoint is not None:
        old = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        old_fp = old.get("data", {}).get("fingerprint")
        if old_fp and old_fp != data.fingerprint and not args.force:
            raise FerTuneError(
                f"--resume: the data differ from the run's (fingerprint {old_fp} -> "
                f"{data.fingerprint}); pass --force to continue anyway"
            )
        if checkpoint["epoch"] >= cfg.epochs:
            print(
                f"{out}: already trained {checkpoint['epoch']} of {cfg.epochs} epochs; "
                "raise epochs with --set epochs=N to train further",
                file=sys.stderr,
            )
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    sizes = data.describe()["sizes"]
    print(
        f"training {cfg.model} (width {cfg.width}) on {data.format} data [{data.protocol}: train "
        f"{sizes['train']:,} / val {sizes['val']:,} / test {sizes['test']:,}] on {device} "
        f"({record['precision']}), "
        f"epochs {checkpoint['epoch'] + 1 if checkpoint else 1}..{cfg.epochs}",
        file=sys.stderr,
    )

    trained = {**data.describe(), "test_crops": cfg.test_crops}  # what evaluate / predict default to

    def on_epoch(metrics: dict, take: Take | None) -> None:
        if take is not None:
            state = take()
            save_checkpoint({**state, "data": trained}, last)
            if metrics["is_best"]:
                save_checkpoint({**state, "rng": {}, "optimizer": {}, "scheduler": {}, "data": trained}, best_path)
            record["history"], record["best"] = state["history"], state["best"]
        write_json(metrics_path, record)

    bar = [] if args.quiet else [ProgressBar()]
    result = fit(cfg, data, device=device, checkpoint=checkpoint, on_epoch=on_epoch, observers=bar)
    if result.checkpoint is not None:
        record["history"], record["best"] = result.checkpoint["history"], result.checkpoint["best"]
    record["status"], record["message"] = result.status, result.message
    if result.status == "diverged":
        write_json(metrics_path, record)
        print(f"fer-tune: {result.message}", file=sys.stderr)
        return 1
    if best_path.exists():
        model, _ = model_from_checkpoint(load_checkpoint(best_path), device)
        images, labels = data.arrays("test")
        record["test"] = evaluate_model(
            model, images, labels, device=device, crops=cfg.test_crops, batch_size=cfg.eval_batch_size, amp=cfg.amp
        )
        record["test"]["checkpoint"] = "best.pt"
        record["test"]["epoch"] = record["best"]["epoch"]
        record["test"]["saliency"] = saliency_sample(model, images, labels, out, device=device)
        print(
            f"best val accuracy {record['best']['val_acc']:.2f} % at epoch {record['best']['epoch']}; "
            f"test ({data.protocol} protocol), best-val checkpoint:"
        )
        print(format_report(record["test"]))
    write_json(metrics_path, record)
    print(f"\nwrote {metrics_path}, {last}, {best_path}", file=sys.stderr)
    return 0


EVALUATE_USAGE = "fer-tune evaluate MODEL [--data PATH]"


def model_data(args: argparse.Namespace, trained: dict) -> str | None:
    """The data `evaluate` scores: --data, else the data the model was trained on (a real dataset only where it
    still is; refused when it has gone), else the synthetic faces with a warning (a file without the record)."""
    if args.data is not None:
        return args.data
    if not trained:
        log.warning(
            "%s does not record the data it was trained on: scoring it on the synthetic faces (pass --data PATH)",
            args.checkpoint,
        )
        return None
    if trained["format"] == "synthetic":
        return trained["source"]
    if not Path(trained["source"]).exists():
        raise FerTuneError(
            f"{args.checkpoint} was trained on {trained['format']} data at {trained['source']}, which is not "
            "here: pass --data PATH/TO/fer2013 (its copy on this machine)"
        )
    log.info("scoring on the data the model was trained on: %s", trained["source"])
    return trained["source"]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..device import select_device
    from ..evaluate import evaluate_model, format_report, saliency_sample
    from ..predict import model_file
    from ..train import load_checkpoint, model_from_checkpoint, trained_on

    args.checkpoint = model_file(args.checkpoint)
    state = load_checkpoint(args.checkpoint, EVALUATE_USAGE)
    trained = trained_on(state)
    device = select_device(args.device)
    model, cfg = model_from_checkpoint(state, device)
    protocol = args.protocol or trained.get("protocol") or cfg.protocol
    data = load_data(args, protocol, model_data(args, trained))
    if trained and data.fingerprint != trained["fingerprint"] and data.protocol == trained.get("protocol"):
        log.warning(
            "note: these data (fingerprint %s) are not those %s was trained on (%s): its %s split may hold images "
            "it trained on",
            data.fingerprint,
            args.checkpoint,
            trained["fingerprint"],
            args.split,
        )
    images, labels = data.arrays(args.split)
    result = evaluate_model(
        model,
        images,
        labels,
        device=device,
        crops=args.crops or trained.get("test_crops") or cfg.test_crops,
        batch_size=cfg.eval_batch_size,
        amp=cfg.amp,
    )
    result.update(
        {"checkpoint": str(args.checkpoint), "split": args.split, "protocol": data.protocol, "data": data.describe()}
    )
    if args.saliency:
        result["saliency"] = saliency_sample(model, images, labels, args.saliency, device=device)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        members = len(state.get("members") or ())
        ensemble = f" (an ensemble of {members} models)" if members else ""
        print(f"{args.checkpoint}{ensemble} on {args.split} ({data.protocol} protocol, {data.format} data):")
        print(format_report(result))
        if args.saliency:
            print(f"\nsaliency maps: {result['saliency']['png']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = parser_with(
        sub,
        "models",
        "list the models with their parameter counts",
        """
        fer-tune models
        fer-tune models --json
    """,
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = parser_with(
        sub,
        "train",
        "train one model without Ray (progress bar, checkpoints, metrics.json)",
        """
        fer-tune train --set width=0.25 --set epochs=5 --out results/first-run
        fer-tune train --data fer2013.csv --config my.yaml --out results/paper-run
        fer-tune train --out results/paper-run --resume --set epochs=350
    """,
    )
    add_data_options(p)
    p.add_argument("--config", default=None, help="TrainConfig as .yaml or .json (default: the paper's settings)")
    p.add_argument(
        "--set",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="override config keys: --set width=0.25 epochs=5 (repeatable)",
    )
    p.add_argument("--out", required=True, help="run directory (metrics.json, last.pt, best.pt)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--force", action="store_true", help="resume even if the data changed")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = parser_with(
        sub,
        "evaluate",
        "evaluate a checkpoint: top-1/top-2, confusion, P/R/F1, saliency",
        """
        fer-tune evaluate results/first-run/best.pt
        fer-tune evaluate best.pt --data fer2013.csv --split test --json
        fer-tune evaluate best.pt --saliency results/first-run/saliency
    """,
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        metavar="MODEL",
        help="a model.pt, a training checkpoint (best.pt, last.pt) or a final stage's directory",
    )
    add_data_options(p, default="the data the model was trained on", default_protocol="the model's")
    p.add_argument(
        "--split", choices=("train", "val", "test"), default="test", help="the split to score (default test)"
    )
    p.add_argument(
        "--crops",
        choices=("ten", "center"),
        default=None,
        help="test crops (default: those of the model's recorded test score)",
    )
    p.add_argument("--saliency", default=None, metavar="DIR", help="also write saliency maps (PNG + npz) to DIR")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_evaluate)
