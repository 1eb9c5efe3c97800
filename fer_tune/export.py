"""A final stage's model, exported for use: model.pt (fer-tune checkpoint: predict / evaluate), model.pt2 (torch.export
program of the network), model.onnx (the network with its test crops inside, for onnxruntime, OpenCV DNN and mobile
runtimes, checked against the torch model with onnxruntime when it is written) and model.json, the model card.

model.onnx takes what a face detector gives: float32 (N, 1, 48, 48) grayscale pixels in 0..255, and returns the
logits (N, 7) averaged over the model's test crops (TenCrop(40) for a final stage's model), in the order of `classes`.

An ensemble of trained networks (export_ensemble) is exported as one model in the same four files: its model.pt holds
every member, and its programs return, per crop, the log of the mean of the members' softmax (combine_logits in
fer_tune.models), averaged over the crops in model.onnx as a single network's logits are.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, augment
from .common import EMOTIONS, code_revision, write_json
from .predict import ONNX_INPUT, ONNX_META_KEY, ONNX_OUTPUT

log = logging.getLogger(__name__)
ONNX_TOLERANCE = 1e-4  # max abs logit difference allowed between onnxruntime and torch
# how the card speaks of a network (False) and of an ensemble (True): what model.pt2 and model.onnx hold, what the
# program returns, how the outputs are combined into probabilities
_WORDS = {
    False: ("the network", "logits (N, 7)", "mean of the crops' logits, then softmax"),
    True: (
        "the ensemble (every member)",
        "the log of the mean of the members' softmax (N, 7)",
        "each crop: the log of the mean of the members' softmax; then the mean over the crops, then softmax",
    ),
}


class FaceNet(torch.nn.Module):
    """The network with its test crops: (N, 1, 48, 48) pixels in 0..255 -> logits averaged over the crops."""

    def __init__(self, net: torch.nn.Module, crops: str):
        super().__init__()
        self.net, self.crops = net, crops
        size, crop = augment.SIZE, augment.CROP
        offsets = augment.FIVE_OFFSETS if crops == "ten" else augment.FIVE_OFFSETS[4:]
        self.views = [
            (t, left, flip) for flip in ((False, True) if crops == "ten" else (False,)) for t, left in offsets
        ]
        assert all(t + crop <= size and left + crop <= size for t, left, _ in self.views)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        x = faces / 255.0
        crop, n = augment.CROP, faces.shape[0]
        flipped = x.flip(-1)
        views = [(flipped if f else x)[:, :, t : t + crop, left : left + crop] for t, left, f in self.views]
        logits = self.net(torch.stack(views, 1).reshape(n * len(views), 1, crop, crop))
        return logits.reshape(n, len(views), -1).mean(1)


def export_model(
    model: Any,
    ft_cfg: Any,
    cfg: Any,
    weights: dict,
    test: dict,
    out_dir: Path,
    provenance: dict,
    check_faces: np.ndarray,
    test_crops: str,
) -> None:
    """model.pt, model.pt2, model.onnx and model.json of `model` (its state_dict `weights`, its test metrics
    `test`: the final stage's fine-tuned model, the PBT stage's best member);
    `provenance`: {"data": FerData.describe(), "study": ..., "trial": ...}; `check_faces`: uint8 (N, 48, 48) real
    inputs the ONNX file is checked on."""
    config = ft_cfg.to_dict()
    files = {"kind": "fer-tune model", "config": config, "model": weights}
    card = {"kind": "fer-tune model card", "protocol": cfg.protocol, "seed": cfg.seed, "config": config}
    _export(model, files, card, test, out_dir, provenance, check_faces, test_crops)


def export_ensemble(
    members: list[dict], test: dict, out_dir: Path, provenance: dict, check_faces: np.ndarray, test_crops: str
) -> None:
    """model.pt, model.pt2, model.onnx and model.json of the Ensemble of `members` (fer_tune.models), each
    {"config": its TrainConfig dict, "model": its state_dict, "about": what the card says of it}; `test`: the
    ensemble's test metrics (fer_tune.evaluate.metrics_from_logits); `provenance`, `check_faces` as export_model's.
    model.pt holds every member (fer-tune predict / evaluate run the ensemble from it)."""
    from .models import Ensemble, count_params
    from .train import model_from_checkpoint

    members = [{"config": m["config"], "model": m["model"], "about": dict(m.get("about") or {})} for m in members]
    ensemble = Ensemble([model_from_checkpoint(m, torch.device("cpu"))[0] for m in members])
    config = members[0]["config"]
    files = {"kind": "fer-tune ensemble", "config": config, "members": members}
    about = [{**m["about"], "parameters": count_params(net)} for m, net in zip(members, ensemble.members)]
    card = {"kind": "fer-tune ensemble card", "protocol": config["protocol"], "members": about}
    _export(ensemble, files, card, test, out_dir, provenance, check_faces, test_crops)


def _export(
    model: Any, files: dict, own: dict, test: dict, out_dir: Path, provenance: dict, faces: np.ndarray, crops: str
) -> None:
    """The four files of `model` (a network or an Ensemble) with its test crops `crops`, its ONNX file checked on
    `faces`: model.pt is `files` (kind, config, the weights) with the format, classes and data; the card is `own`
    (kind, protocol, what it says of the model) with the common fields."""
    from .cost import model_cost
    from .models import Ensemble
    from .train import save_checkpoint

    trained = {**provenance.get("data", {}), "test_crops": crops}
    checkpoint = {"format": 1, **files, "classes": list(EMOTIONS), "data": trained}
    save_checkpoint(checkpoint, out_dir / "model.pt")
    model = model.float().cpu().eval()
    export_program(model, out_dir / "model.pt2")
    record = {"kind": files["kind"], "classes": list(EMOTIONS), "data": trained}
    onnx = export_onnx(model, out_dir / "model.onnx", crops, record, faces)
    what, output, combine = _WORDS[isinstance(model, Ensemble)]
    card = {
        "kind": own["kind"],
        "classes": list(EMOTIONS),
        "preprocessing": {
            "grayscale": True,
            "face": "a face crop framed as FER2013's (fer-tune predict finds faces with OpenCV's frontal-face "
            "cascade and frames them so)",
            "resize": [augment.SIZE, augment.SIZE],
            "normalization": "pixel / 255, no mean or std",
            "crops": {"ten": f"TenCrop({augment.CROP})", "center": f"CenterCrop({augment.CROP})"}[crops],
            "combine": combine,
        },
        "inputs": {
            "model.pt2": f"float32 (N, 1, {augment.CROP}, {augment.CROP}) crops in [0, 1] -> {output}",
            "model.onnx": f"{ONNX_INPUT}: float32 (N, 1, {augment.SIZE}, {augment.SIZE}) pixels in 0..255 -> "
            f"{ONNX_OUTPUT} (N, 7), the crops inside",
        },
        "data": trained,
        "protocol": own["protocol"],
        "test": {
            "split": f"test ({own['protocol']} protocol)",
            "n": test["n"],
            "top1": test["top1"],
            "top2": test["top2"],
            "macro_f1": test["macro_f1"],
            "recall": {e: test["per_class"][e]["recall"] for e in EMOTIONS},
            "crops": crops,
        },
        "study": provenance.get("study"),
        "trial": provenance.get("trial"),
        **{k: v for k, v in own.items() if k not in ("kind", "protocol")},
        "onnx": onnx,
        # what it costs to run (fer_tune.cost): counted, and timed here at export (fp32, this machine's CPU)
        "cost": {
            **model_cost(model, torch.device("cpu"), crops, None),
            "latency": f"ms per image with its test crops, batch 1, fp32, on the exporting machine's CPU with "
            f"{torch.get_num_threads()} thread(s)",
        },
        "versions": versions(),
        "code": code_revision(),
        "files": {
            "model.pt": "fer-tune checkpoint (fer-tune predict / evaluate)",
            "model.pt2": f"torch.export program of {what}: torch.export.load(path).module()(crops)",
            "model.onnx": f"{what} with its test crops (onnxruntime, OpenCV DNN); fer-tune predict runs it",
        },
    }
    if onnx["status"] != "checked":
        card["files"].pop("model.onnx")
    write_json(out_dir / "model.json", card)


def versions() -> dict:
    import torchvision

    out = {"fer_tune": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}
    for name in ("onnx", "onnxruntime"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def export_program(model: Any, path: Path) -> None:
    """A torch.export program of the network (fp32, CPU, dynamic batch)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.zeros(2, 1, augment.CROP, augment.CROP),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def export_onnx(model: Any, path: Path, crops: str, record: dict, check_faces: np.ndarray) -> dict:
    """model.onnx (dynamic batch) with `record` in its metadata, checked with onnxruntime against the torch model on
    `check_faces`; {status, opset, max_abs_logit_diff, checked_on, tolerance}. A file that fails the check is
    removed and the reason recorded (the torch files stay the model)."""
    from .train import predict_logits

    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        log.warning("model.onnx not written: %s is not installed", exc.name)
        return {"status": "not exported", "reason": f"{exc.name} is not installed"}
    net = FaceNet(model, crops).eval()
    sample = torch.from_numpy(np.ascontiguousarray(check_faces[:64])).float().unsqueeze(1)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        net,
        (sample,),
        dynamo=True,
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    program.save(str(path))
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_META_KEY, json.dumps({**record, "test_crops": crops, "fer_tune": __version__})
    onnx.save(proto, str(path))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([ONNX_OUTPUT], {ONNX_INPUT: sample.numpy()})[0]
    with torch.no_grad():
        want = predict_logits(model, sample.squeeze(1).to(torch.uint8), crops=crops).numpy()
    diff = float(np.abs(got - want).max())
    one = session.run([ONNX_OUTPUT], {ONNX_INPUT: sample[:1].numpy()})[0]  # the batch is dynamic
    diff = max(diff, float(np.abs(one - want[:1]).max()))
    out = {"opset": opset, "max_abs_logit_diff": diff, "tolerance": ONNX_TOLERANCE, "checked_on": len(sample)}
    if diff <= ONNX_TOLERANCE:
        return {"status": "checked", **out}
    path.unlink()
    log.warning("model.onnx removed: its logits differ from the torch model's by %.2g (> %g)", diff, ONNX_TOLERANCE)
    return {"status": "failed the check", **out}
