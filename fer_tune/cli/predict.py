"""`fer-tune predict`: classifying face images with a trained model."""

from __future__ import annotations

import argparse
import json

from .common import log, parser_with


def cmd_predict(args: argparse.Namespace) -> int:
    from ..predict import load_model, predict
    from ..train import trained_on

    state = load_model(args.model)
    if trained_on(state).get("format") == "synthetic":
        log.warning(
            "%s was trained on fer-tune's synthetic faces (the demo's), not on photos: its answers for real faces "
            "mean nothing; a model to use is trained on FER2013 (--data)",
            args.model,
        )
    results = predict(state, args.images)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        top = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])
        print(f"{r['image']}: {r['emotion']}  (" + ", ".join(f"{e} {p * 100:.1f} %" for e, p in top[:3]) + ")")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = parser_with(
        sub,
        "predict",
        "classify face images (any size; grayscale 48x48, the test crops of the model's score: TenCrop for a final stage's)",
        """
        fer-tune predict results/joint/final/model.pt face1.jpg face2.png
        fer-tune predict results/joint/final photo.jpg --json
    """,
    )
    p.add_argument(
        "model", metavar="MODEL", help="a model.pt (final stage), a training checkpoint, or a final stage directory"
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="face images (any size and format PIL reads)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)
