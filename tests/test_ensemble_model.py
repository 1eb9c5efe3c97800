"""An ensemble of trained networks as one model: combine_logits is the mean of the members' probabilities, and
export_ensemble's four files give the in-memory Ensemble's answers: model.pt (through model_from_checkpoint,
`fer-tune evaluate` and `fer-tune predict`), model.pt2, model.onnx (checked, run with onnxruntime) and a card that
lists the members and costs them all together."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import run_in_process

from fer_tune.common import EMOTIONS, EXPORTS
from fer_tune.config import TrainConfig
from fer_tune.data import load
from fer_tune.evaluate import metrics_from_logits
from fer_tune.models import Ensemble, combine_logits, count_params
from fer_tune.train import fit, load_checkpoint, model_from_checkpoint, predict_logits

CPU = torch.device("cpu")
SOURCE = "synthetic:600"
CROPS = "ten"
# members that differ in width, dropout, optimizer and seed: each trained 4 epochs on the synthetic faces
MEMBERS = (
    {"width": 0.0625, "dropout": 0.1, "seed": 0, "lr": 0.05},
    {"width": 0.125, "dropout": 0.4, "seed": 1, "optimizer": "adam", "lr": 0.003},
    {"width": 0.0625, "dropout": 0.3, "seed": 2, "optimizer": "adam", "lr": 0.003},
)


def run(*args):
    return run_in_process(dict(os.environ), [*map(str, args)])


def test_combine_logits_is_the_log_of_the_mean_of_the_members_probabilities():
    g = torch.Generator().manual_seed(0)
    stacked = torch.randn(3, 5, 10, 7, generator=g) * 4  # members, images, crops, classes
    combined = combine_logits(stacked)
    assert combined.shape == (5, 10, 7) and combined.dtype == torch.float32
    want = torch.softmax(stacked.double(), -1).mean(0)
    torch.testing.assert_close(torch.softmax(combined.double(), -1), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(combined.exp().sum(-1), torch.ones(5, 10), atol=1e-5, rtol=0)  # log-probabilities
    # not the mean of the logits: that ensemble answers otherwise here
    assert not torch.allclose(torch.softmax(stacked.mean(0), -1), want.float(), atol=1e-3)
    one = stacked[1:2]
    torch.testing.assert_close(torch.softmax(combine_logits(one), -1), torch.softmax(one[0], -1), atol=1e-6, rtol=0)
    assert torch.equal(combine_logits(one).argmax(-1), one[0].argmax(-1))
    # stable: logits far beyond exp's range
    huge = torch.tensor([[[1000.0, 0.0, -1000.0, 0, 0, 0, 0]], [[0.0, 2000.0, 0, 0, 0, 0, 0]]])
    probs = torch.softmax(combine_logits(huge), -1)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs[0, :2], torch.tensor([0.5, 0.5]), atol=1e-6, rtol=0)
    # bf16 logits (autocast) are combined in float32
    assert combine_logits(stacked.bfloat16()).dtype == torch.float32


@pytest.fixture(scope="module")
def trained():
    """(the data, the members as export_ensemble takes them, the Ensemble of them, its test metrics)."""
    torch.set_num_threads(1)
    data = load(SOURCE, "paper")
    members = []
    for i, changes in enumerate(MEMBERS):
        cfg = TrainConfig(
            epochs=4, batch_size=32, train_crops="one", erase_p=0.0, test_crops=CROPS, threads=1, **changes
        )
        result = fit(cfg, data, device=CPU)
        assert result.status == "completed", result.message
        about = {"arm": "test", "trial": i, "params": changes, "val_acc": result.best["val_acc"]}
        members.append({"config": cfg.to_dict(), "model": result.checkpoint["model"], "about": about})
    nets = [model_from_checkpoint(m, CPU)[0] for m in members]
    ensemble = Ensemble(nets).eval()
    x_test, y_test = data.arrays("test")
    logits = predict_logits(ensemble, torch.from_numpy(x_test), crops=CROPS)
    assert len(set(logits.argmax(1).tolist())) > 1  # not a collapsed model: its answers tell models apart
    test = metrics_from_logits(logits, y_test)
    return data, members, ensemble, {**test, "crops": CROPS}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from fer_tune.export import export_ensemble

    data, members, _, test = trained
    out = tmp_path_factory.mktemp("ensemble")
    x_test, _ = data.arrays("test")
    export_ensemble(members, test, out, {"data": data.describe(), "study": "s", "trial": None}, x_test[:64], CROPS)
    return out


def test_the_ensemble_forward_combines_its_members(trained):
    data, _, ensemble, _ = trained
    x = torch.from_numpy(data.arrays("test")[0][:8]).float().div(255).unsqueeze(1)[:, :, 4:44, 4:44]
    with torch.no_grad():
        outs = torch.stack([m(x) for m in ensemble.members])
        got = ensemble(x)
    torch.testing.assert_close(got, combine_logits(outs))
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)  # the members differ


def test_export_writes_the_four_files_and_they_give_the_ensembles_answers(trained, exported):
    import onnxruntime as ort

    from fer_tune.export import FaceNet
    from fer_tune.predict import ONNX_INPUT, ONNX_META_KEY, ONNX_OUTPUT

    data, members, ensemble, test = trained
    assert sorted(p.name for p in exported.iterdir()) == sorted(EXPORTS)
    card = json.loads((exported / "model.json").read_text())
    assert card["onnx"]["status"] == "checked" and card["onnx"]["max_abs_logit_diff"] <= 1e-4

    # model.onnx through onnxruntime = the torch Ensemble through FaceNet, on real faces
    faces = torch.from_numpy(data.arrays("test")[0][:40]).float().unsqueeze(1)
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run([ONNX_OUTPUT], {ONNX_INPUT: faces.numpy()})[0]
    with torch.no_grad():
        want = FaceNet(ensemble, CROPS).eval()(faces).numpy()
    assert got.shape == (40, 7)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    record = json.loads(session.get_modelmeta().custom_metadata_map[ONNX_META_KEY])
    assert record["kind"] == "fer-tune ensemble" and record["test_crops"] == CROPS
    assert record["data"]["fingerprint"] == data.fingerprint

    # model.pt: every member, read back into the same Ensemble
    state = load_checkpoint(exported / "model.pt")
    assert state["kind"] == "fer-tune ensemble" and len(state["members"]) == len(MEMBERS) and "model" not in state
    assert [m["config"]["width"] for m in state["members"]] == [c["width"] for c in MEMBERS]
    assert state["data"]["test_crops"] == CROPS and state["data"]["fingerprint"] == data.fingerprint
    model, cfg = model_from_checkpoint(state, CPU)
    assert isinstance(model, Ensemble) and not model.training and cfg.width == MEMBERS[0]["width"]
    images = torch.from_numpy(data.arrays("test")[0])
    torch.testing.assert_close(
        predict_logits(model, images, crops=CROPS), predict_logits(ensemble, images, crops=CROPS), atol=1e-6, rtol=0
    )

    # model.pt2: the Ensemble on crops
    crops = faces[:8, :, 4:44, 4:44] / 255
    program = torch.export.load(str(exported / "model.pt2")).module()
    with torch.no_grad():
        torch.testing.assert_close(program(crops), ensemble(crops), atol=1e-5, rtol=0)


def test_the_card_lists_the_members_and_costs_them_together(trained, exported):
    _, members, ensemble, test = trained
    card = json.loads((exported / "model.json").read_text())
    assert card["kind"] == "fer-tune ensemble card"
    assert [{k: v for k, v in m.items() if k != "parameters"} for m in card["members"]] == [
        json.loads(json.dumps(m["about"])) for m in members
    ]
    sizes = [count_params(model_from_checkpoint({"config": m["config"], "model": m["model"]}, CPU)[0]) for m in members]
    assert [m["parameters"] for m in card["members"]] == sizes and sizes[0] != sizes[1]
    assert card["cost"]["params"] == pytest.approx(sum(sizes) / 1e6, rel=1e-12)
    assert card["cost"]["mflops"] > 0 and card["cost"]["latency_ms"] > 0 and "thread(s)" in card["cost"]["latency"]
    assert "members' softmax" in card["preprocessing"]["combine"]
    assert card["test"]["top1"] == test["top1"] and card["test"]["crops"] == CROPS and card["protocol"] == "paper"
    assert card["data"]["source"] == SOURCE and card["study"] == "s"
    assert set(card["files"]) == set(EXPORTS) - {"model.json"} and {"versions", "code", "onnx"} <= set(card)


def test_evaluate_scores_the_ensemble(trained, exported):
    from fer_tune.device import precision

    data, members, ensemble, _ = trained
    cfg = TrainConfig.from_dict(members[0]["config"])
    images, labels = data.arrays("test")
    dtype, _ = precision(CPU, cfg.amp)  # evaluate's precision on this CPU
    logits = predict_logits(
        ensemble, torch.from_numpy(images), crops=CROPS, batch_size=cfg.eval_batch_size, dtype=dtype
    )
    want = metrics_from_logits(logits, labels)

    r = run("evaluate", exported / "model.pt", "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["n"] == len(labels) and result["crops"] == CROPS
    assert result["top1"] == want["top1"] and result["confusion"] == want["confusion"]
    assert result["loss"] == pytest.approx(want["loss"], abs=1e-6)

    r = run("evaluate", exported, "--device", "cpu")  # the directory: its model.pt
    assert r.returncode == 0, r.stderr
    header, scores = r.stdout.splitlines()[:2]
    assert "(an ensemble of 3 models) on test" in header
    assert f"top-1 {want['top1']:.2f} %" in scores


def test_predict_with_model_pt_and_model_onnx_agree_on_every_face(trained, exported, tmp_path):
    from PIL import Image

    data, _, ensemble, _ = trained
    faces = data.arrays("test")[0][:12]
    for i, face in enumerate(faces):
        Image.fromarray(face).save(tmp_path / f"face{i:02d}.png")
    answers = {}
    for name in ("model.pt", "model.onnx"):
        r = run("predict", exported / name, tmp_path, "--no-detect", "--json")
        assert r.returncode == 0, r.stderr
        answers[name] = [json.loads(line)["faces"][0] for line in r.stdout.splitlines()]
    assert len(answers["model.pt"]) == len(answers["model.onnx"]) == len(faces)
    assert [f["label"] for f in answers["model.pt"]] == [f["label"] for f in answers["model.onnx"]]
    probs = {name: np.array([[f["probabilities"][e] for e in EMOTIONS] for f in fs]) for name, fs in answers.items()}
    np.testing.assert_allclose(probs["model.onnx"], probs["model.pt"], atol=1e-5)
    # the ensemble's probabilities: the softmax of its crop-averaged log-mean-probabilities
    want = torch.softmax(predict_logits(ensemble, torch.from_numpy(faces), crops=CROPS), 1).numpy()
    np.testing.assert_allclose(probs["model.pt"], want, atol=2e-6)
    assert [f["label"] for f in answers["model.pt"]] == [EMOTIONS[i] for i in want.argmax(1)]


def test_a_single_models_export_keeps_its_own_card(trained, tmp_path):
    from fer_tune.export import export_model

    data, members, _, test = trained
    cfg = TrainConfig.from_dict(members[1]["config"])
    model, _ = model_from_checkpoint(members[1], CPU)
    x_test, _ = data.arrays("test")
    export_model(model, cfg, cfg, members[1]["model"], test, tmp_path, {"data": data.describe()}, x_test[:16], CROPS)
    state = load_checkpoint(tmp_path / "model.pt")
    assert state["kind"] == "fer-tune model" and "members" not in state and state["config"] == cfg.to_dict()
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["kind"] == "fer-tune model card" and "members" not in card
    assert card["seed"] == cfg.seed and card["config"] == cfg.to_dict()
    assert card["preprocessing"]["combine"] == "mean of the crops' logits, then softmax"
    assert card["onnx"]["status"] == "checked"
    assert card["cost"]["params"] == pytest.approx(count_params(model) / 1e6, rel=1e-12)
