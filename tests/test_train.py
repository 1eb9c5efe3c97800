"""The training loop, checkpoints, divergence, evaluation metrics and the train/evaluate/models commands."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fer_tune import data as fdata
from fer_tune.cli import main
from fer_tune.common import EMOTIONS, FerTuneError
from fer_tune.config import TrainConfig
from fer_tune.evaluate import metrics_from_logits
from fer_tune.train import build_model, eval_images_per_batch, fit, load_checkpoint, predict_logits, save_checkpoint

CPU = torch.device("cpu")
TINY = dict(width=0.0625, train_crops="one", test_crops="center", batch_size=32)


@pytest.fixture(scope="module")
def small():
    return fdata.load("synthetic:400", "paper")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_fit_learns_the_synthetic_faces():
    d = fdata.load("synthetic:3000", "paper")
    y_val = d.arrays("val")[1]
    majority = 100 * np.bincount(y_val).max() / len(y_val)
    cfg = TrainConfig(
        width=0.125, epochs=5, lr=0.02, dropout=0.0, train_crops="one", test_crops="center", batch_size=32
    )
    r = fit(cfg, d, device=CPU)
    assert r.status == "completed" and [h["epoch"] for h in r.history] == [1, 2, 3, 4, 5]
    for h in r.history:
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s"} <= set(h)
        assert 0 <= h["val_acc"] <= 100 and h["images_per_s"] > 0
    assert r.best["val_acc"] == max(h["val_acc"] for h in r.history)
    assert r.best["val_acc"] > majority + 15, (majority, [h["val_acc"] for h in r.history])


@pytest.mark.parametrize("scheduler,crops", [("rlrp", "ten"), ("onecycle", "one"), ("cosine_wr", "one")])
def test_resume_gives_the_same_weights(small, scheduler, crops):
    epochs = 2 if crops == "ten" else 3  # ten crops train 10x the images: one epoch on each side of the resume,
    if crops == "ten":  # on half the faces
        small = fdata.load("synthetic:200", "paper")
    cfg = TrainConfig(**{**TINY, "train_crops": crops}, epochs=epochs, scheduler=scheduler, patience=0, t_0=1)
    straight = fit(cfg, small, device=CPU)
    # an interrupted run: the caller stops it after epoch 1, then it resumes from that checkpoint
    first = fit(cfg, small, device=CPU, on_epoch=lambda m, s: m["epoch"] < 1)
    assert first.status == "stopped" and first.checkpoint["epoch"] == 1
    resumed = fit(cfg, small, device=CPU, checkpoint=first.checkpoint)
    a, b = straight.checkpoint["model"], resumed.checkpoint["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    timing = ("epoch_seconds", "images_per_s")
    strip = lambda hist: [{k: v for k, v in h.items() if k not in timing} for h in hist]  # noqa: E731
    assert strip(straight.history) == strip(resumed.history)


def test_checkpoint_round_trip_through_a_file(small, tmp_path):
    cfg = TrainConfig(**TINY, epochs=2)
    straight = fit(cfg, small, device=CPU)
    first = fit(cfg.replace(epochs=1), small, device=CPU)
    save_checkpoint(first.checkpoint, tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind
    resumed = fit(cfg, small, device=CPU, checkpoint=load_checkpoint(tmp_path / "last.pt"))
    for k, v in straight.checkpoint["model"].items():
        assert torch.equal(v, resumed.checkpoint["model"][k]), k


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(FerTuneError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FerTuneError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(FerTuneError, match="not a fer-tune checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_divergence_is_a_result_not_a_crash(small):
    seen = []
    cfg = TrainConfig(**TINY, epochs=3, optimizer="sgd", momentum=0.0, lr=1e6)
    r = fit(cfg, small, device=CPU, on_epoch=lambda m, take: seen.append((m, take)))
    assert r.status == "diverged" and "diverged at epoch 1" in r.message and "smaller lr" in r.message
    assert r.history == [] and r.checkpoint is None
    assert len(seen) == 1 and seen[0][0]["status"] == "diverged" and seen[0][1] is None


def test_caller_can_stop_early(small):
    r = fit(TrainConfig(**TINY, epochs=5), small, device=CPU, on_epoch=lambda m, s: m["epoch"] < 2)
    assert r.status == "stopped" and len(r.history) == 2 and r.checkpoint["epoch"] == 2


def test_too_small_train_split():
    class Tiny:
        def arrays(self, split):
            return np.zeros((1, 48, 48), np.uint8), np.zeros(1, np.int64)

    with pytest.raises(FerTuneError, match="too few"):
        fit(TrainConfig(**{**TINY, "batch_size": 64}, epochs=1), Tiny(), device=CPU)


def test_metrics_on_a_hand_made_case():
    # 4 images: true 0,0,1,3. predictions (argmax) 0,1,1,2; second choices 1,0,0,3
    logits = torch.full((4, 7), -5.0)
    for i, (p1, p2) in enumerate([(0, 1), (1, 0), (1, 0), (2, 3)]):
        logits[i, p1], logits[i, p2] = 5.0, 1.0
    m = metrics_from_logits(logits, torch.tensor([0, 0, 1, 3]))
    assert m["n"] == 4 and m["top1"] == 50.0 and m["top2"] == 100.0
    conf = np.zeros((7, 7), int)
    conf[0, 0], conf[0, 1], conf[1, 1], conf[3, 2] = 1, 1, 1, 1
    assert m["confusion"] == conf.tolist()
    pc = m["per_class"]
    assert list(pc) == list(EMOTIONS)
    assert pc["angry"] == pytest.approx({"precision": 100.0, "recall": 50.0, "f1": 200 / 3, "support": 2})
    assert pc["disgust"] == pytest.approx({"precision": 50.0, "recall": 100.0, "f1": 200 / 3, "support": 1})
    assert pc["happy"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert pc["fear"]["support"] == 0
    # macro F1 over the classes present in the labels (angry, disgust, happy)
    assert m["macro_f1"] == pytest.approx((200 / 3 + 200 / 3 + 0) / 3)
    expected_loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 1, 3])).item()
    assert m["loss"] == pytest.approx(expected_loss)


def test_evaluation_batches_do_not_change_the_logits():
    """eval_batch_size 0 = auto: 128 crops' worth per pass on a CPU (cache-sized), 256 images on CUDA; the logits
    do not depend on the batch size (BatchNorm in eval mode)."""
    assert eval_images_per_batch(CPU, "ten") == 12 and eval_images_per_batch(CPU, "center") == 128
    assert eval_images_per_batch(CPU, "ten", 5) == 5 and eval_images_per_batch(torch.device("cuda"), "ten") == 256
    assert TrainConfig().eval_batch_size == 0
    torch.manual_seed(0)
    model = build_model(TrainConfig(width=0.0625), CPU)
    images = torch.randint(0, 256, (30, 48, 48), dtype=torch.uint8)
    auto = predict_logits(model, images, crops="ten")
    assert auto.shape == (30, 7)
    torch.testing.assert_close(predict_logits(model, images, crops="ten", batch_size=256), auto)
    torch.testing.assert_close(predict_logits(model, images, crops="ten", batch_size=7), auto)
    with pytest.raises(FerTuneError, match="eval_batch_size must be >= 0"):
        TrainConfig(eval_batch_size=-1)


def test_config_rejects_bad_values():
    with pytest.raises(FerTuneError, match="optimizer='rmsprop' is not one of"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(FerTuneError, match="dropout must be in"):
        TrainConfig().with_overrides(["dropout=1.5"])
    for bad in ("1.5", "-0.1"):  # a probability: [0, 1]
        with pytest.raises(FerTuneError, match=r"erase_p must be in \[0, 1\]"):
            TrainConfig().with_overrides([f"erase_p={bad}"])
    assert TrainConfig(erase_p=1.0).erase_p == 1.0  # every crop erased: allowed
    with pytest.raises(FerTuneError, match="sgd_nesterov needs momentum"):
        TrainConfig(momentum=0.0)


def test_models_command(capsys):
    code, out, _ = run(capsys, "models", "--json")
    table = {row["name"]: row["params"] for row in json.loads(out)}
    assert code == 0 and table["vgg_variant"] == 29_890_759
    assert set(table) == {"vgg_variant", "vgg16", "resnet50", "efficientnet_b3"}


@pytest.mark.slow
def test_train_and_evaluate_commands_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "run"
    args = [
        "train",
        "--data",
        "synthetic:1500",
        "--out",
        str(out_dir),
        "--quiet",
        "--set",
        "width=0.125",
        "--set",
        "epochs=3",
        "--set",
        "lr=0.02",
        "--set",
        "dropout=0",
        "--set",
        "train_crops=one",
        "--set",
        "batch_size=32",
    ]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "Traceback" not in err and "best val accuracy" in out  # the result on stdout, progress on stderr
    assert_code_revision_recorded(out_dir)
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["status"] == "completed" and m["protocol"] == "paper" and m["config"]["width"] == 0.125
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    sizes = m["data"]["sizes"]
    assert sizes["test"] == 150 and sizes["train"] + sizes["val"] == 1350
    test = m["test"]
    assert test["crops"] == "ten" and test["n"] == 150 and test["epoch"] == m["best"]["epoch"]
    conf = np.array(test["confusion"])
    assert conf.sum() == 150
    majority = 100 * conf.sum(1).max() / 150  # always guessing the most frequent class
    assert test["top1"] > majority + 3 and test["top2"] >= test["top1"]
    assert Path(test["saliency"]["png"]).is_file() and Path(test["saliency"]["npz"]).is_file()
    assert test["saliency"]["n"] == sum(min(4, n) for n in conf.sum(1))  # 4 per class where there are 4
    assert {p.name for p in out_dir.iterdir()} >= {"metrics.json", "config.json", "last.pt", "best.pt"}

    # evaluate gives the same numbers as the metrics.json test block
    code, out, err = run(capsys, "evaluate", str(out_dir / "best.pt"), "--data", "synthetic:1500", "--json")
    assert code == 0, err
    ev = json.loads(out)
    assert ev["top1"] == pytest.approx(test["top1"]) and ev["confusion"] == test["confusion"]

    # the same --out again is refused; resume can only extend
    code, _, err = run(capsys, *args)
    assert code == 2 and "already holds a run" in err
    code, _, err = run(
        capsys, "train", "--data", "synthetic:1500", "--out", str(out_dir), "--resume", "--set", "lr=0.1", "--quiet"
    )
    assert code == 2 and "lr cannot change" in err
    code, _, err = run(
        capsys, "train", "--data", "synthetic:1500", "--out", str(out_dir), "--resume", "--set", "epochs=4", "--quiet"
    )
    assert code == 0, err
    m2 = json.loads((out_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in m2["history"]] == [1, 2, 3, 4]
    assert m2["history"][:3] == m["history"]
    code, _, err = run(
        capsys, "train", "--data", "synthetic:1600", "--out", str(out_dir), "--resume", "--set", "epochs=5", "--quiet"
    )
    assert code == 2 and "data differ" in err


def test_train_command_reports_divergence(tmp_path, capsys):
    code, _, err = run(
        capsys,
        "train",
        "--data",
        "synthetic:300",
        "--out",
        str(tmp_path / "d"),
        "--quiet",
        "--set",
        "width=0.0625",
        "--set",
        "optimizer=sgd",
        "--set",
        "momentum=0",
        "--set",
        "lr=1e6",
        "--set",
        "train_crops=one",
        "--set",
        "epochs=2",
    )
    assert code == 1 and "diverged" in err and "Traceback" not in err
    assert json.loads((tmp_path / "d" / "metrics.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["train", "--out", "X", "--set", "nope=1"], "unknown key(s) nope"),
        (["train", "--out", "X", "--set", "lr"], "expects key=value"),
        (["train", "--out", "X", "--set", "lr=abc"], "lr"),
        (["train", "--out", "X", "--resume"], "nothing to resume"),
        (["train", "--out", "X", "--config", "missing.yaml"], "missing.yaml"),
        (["evaluate", "missing.pt"], "does not exist"),
    ],
)
def test_cli_user_errors(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2 and expected in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_resume_cannot_stretch_a_fixed_length_schedule(tmp_path, capsys):
    base = ["train", "--data", "synthetic:300", "--out", str(tmp_path / "oc"), "--quiet"]
    code, _, err = run(
        capsys,
        *base,
        "--set",
        "width=0.0625",
        "--set",
        "scheduler=onecycle",
        "--set",
        "train_crops=one",
        "--set",
        "test_crops=center",
        "--set",
        "epochs=1",
    )
    assert code == 0, err
    code, _, err = run(capsys, *base, "--resume", "--set", "epochs=2")
    assert code == 2 and "onecycle shapes its whole schedule" in err


# ---------------------------------------------------------------------------------------------------------
# precision: bf16 autocast on CPUs that have it
# ---------------------------------------------------------------------------------------------------------
def test_precision_follows_amp_and_the_cpu(monkeypatch):
    from fer_tune import device as train

    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    assert train.precision(CPU, "auto") == (torch.bfloat16, False)
    assert train.precision(CPU, "off") == (None, False)
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    assert train.precision(CPU, "auto") == (None, False)  # emulated bf16 gains nothing: fp32
    assert train.precision(CPU, "bf16") == (torch.bfloat16, False)  # forced
    assert [train.precision_name(d) for d in (torch.bfloat16, torch.float16, None)] == ["bf16", "fp16", "fp32"]
    with pytest.raises(FerTuneError, match=r"amp='fp16' is not one of auto, bf16, off"):
        TrainConfig(amp="fp16")
    with pytest.raises(FerTuneError, match="amp=bf16 is supported on CUDA and CPU devices, not on mps"):
        train.precision(torch.device("mps"), "bf16")


def test_a_resumed_run_keeps_the_precision_it_trained_with(small, monkeypatch):
    from fer_tune import device as train

    cfg = TrainConfig(**TINY, epochs=2)  # amp=auto
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    first = fit(cfg, small, device=CPU, on_epoch=lambda m, s: m["epoch"] < 1)
    assert first.precision == "fp32" and first.checkpoint["precision"] == "fp32"
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)  # the same run continued on a bf16 CPU
    assert fit(cfg, small, device=CPU, checkpoint=first.checkpoint).precision == "fp32"
    old = {k: v for k, v in first.checkpoint.items() if k != "precision"}  # written before precision was recorded
    assert fit(cfg, small, device=CPU, checkpoint=old).precision == "fp32"  # auto meant fp32 on a CPU then
    assert fit(cfg, small, device=CPU).precision == "bf16"  # a new run takes the CPU's bf16
    assert fit(cfg.replace(amp="off"), small, device=CPU, checkpoint=first.checkpoint).precision == "fp32"


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch, tmp_path):
    from fer_tune import device as train

    real = Path.read_text
    for flags, expected in (
        ("fpu avx512f avx512_bf16 sse", True),
        ("fpu amx_bf16 amx_tile", True),
        ("fpu avx512f avx2", False),
    ):
        monkeypatch.setattr(
            Path,
            "read_text",
            lambda self, *a, _f=flags, **k: (
                f"processor\t: 0\nflags\t\t: {_f}\n" if str(self) == "/proc/cpuinfo" else real(self, *a, **k)
            ),
        )
        assert train.cpu_has_native_bf16() is expected, flags


def test_bf16_training_is_recorded_and_resumes_bit_exact(small):
    cfg = TrainConfig(**TINY, epochs=2, amp="bf16")
    seen = []
    straight = fit(cfg, small, device=CPU, on_epoch=lambda m, s: seen.append(m["precision"]))
    assert straight.precision == "bf16" and seen == ["bf16", "bf16"]
    assert "precision" not in straight.history[0]  # history holds numbers only
    first = fit(cfg, small, device=CPU, on_epoch=lambda m, s: m["epoch"] < 1)
    resumed = fit(cfg, small, device=CPU, checkpoint=first.checkpoint)
    for k, v in straight.checkpoint["model"].items():
        assert torch.equal(v, resumed.checkpoint["model"][k]), k
    fp32 = fit(cfg.replace(amp="off"), small, device=CPU)
    assert fp32.precision == "fp32"
    # bf16 and fp32 train the same model, not the same bits
    assert any(not torch.equal(v, straight.checkpoint["model"][k]) for k, v in fp32.checkpoint["model"].items())


def test_train_command_records_its_precision(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, _, err = run(
        capsys,
        "train",
        "--data",
        "synthetic:300",
        "--out",
        str(out_dir),
        "--quiet",
        "--set",
        "width=0.0625",
        "epochs=1",
        "train_crops=one",
        "test_crops=center",
        "amp=bf16",
    )
    assert code == 0, err
    assert json.loads((out_dir / "metrics.json").read_text())["precision"] == "bf16"
    assert "on cpu (bf16)" in err


def assert_code_revision_recorded(run_dir) -> None:
    """metrics.json names the code revision that produced it: in a git checkout the SHA and whether it was dirty."""
    import fer_tune

    code = json.loads((run_dir / "metrics.json").read_text())["environment"]["code"]
    if (Path(fer_tune.__file__).resolve().parents[1] / ".git").exists():
        assert len(code["sha"]) == 40 and isinstance(code["dirty"], bool), code
    else:
        assert code is None


def test_evaluate_defaults_to_the_data_and_crops_the_model_was_trained_and_scored_with(tmp_path, capsys):
    from PIL import Image

    csv_file = tmp_path / "faces.csv"
    assert run(capsys, "data", "synth", str(csv_file), "--n", "600")[0] == 0
    out_dir = tmp_path / "run"
    tiny = ["width=0.0625", "epochs=1", "train_crops=one", "test_crops=center", "batch_size=32"]
    code, _, err = run(capsys, "train", "--data", str(csv_file), "--out", str(out_dir), "--quiet", "--set", *tiny)
    assert code == 0, err
    test = json.loads((out_dir / "metrics.json").read_text())["test"]
    best = out_dir / "best.pt"
    assert load_checkpoint(best)["data"]["source"] == str(csv_file.resolve())

    # no --data: the CSV it was trained on, with its test crops (center here), the same numbers as metrics.json
    code, out, err = run(capsys, "evaluate", str(best), "--json")
    assert code == 0 and f"scoring on the data the model was trained on: {csv_file.resolve()}" in err
    ev = json.loads(out)
    assert ev["crops"] == "center" and ev["data"]["format"] == "csv"
    assert ev["top1"] == pytest.approx(test["top1"]) and ev["confusion"] == test["confusion"]
    # other data: scored, with a note that they are not the model's
    code, out, err = run(capsys, "evaluate", str(best), "--data", "synthetic:600:5", "--json")
    assert code == 0 and "are not those" in err and json.loads(out)["data"]["format"] == "synthetic"
    # the training data gone: refused in one line that says where they were
    csv_file.rename(tmp_path / "moved.csv")
    code, _, err = run(capsys, "evaluate", str(best))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"was trained on csv data at {csv_file.resolve()}, which is not here: pass --data" in err
    # a file without the record (written before models carried it): synthetic, with a warning
    state = load_checkpoint(best)
    del state["data"]
    save_checkpoint(state, tmp_path / "old.pt")
    code, out, err = run(capsys, "evaluate", str(tmp_path / "old.pt"))
    assert code == 0 and "does not record the data it was trained on" in err and "synthetic data" in out
    # an image where the model goes
    Image.new("L", (48, 48)).save(tmp_path / "face.png")
    code, _, err = run(capsys, "evaluate", str(tmp_path / "face.png"))
    assert code == 2 and "face.png is not a fer-tune model: it is a PNG image (usage: fer-tune evaluate" in err


# ---------------------------------------------------------------------------------------------------------
# the device hot path: torch.compile, fused optimizers, no host syncs in the batch loop
# ---------------------------------------------------------------------------------------------------------
class _Splits:
    def __init__(self, splits):
        self.splits = splits

    def arrays(self, split):
        return self.splits[split]


@pytest.mark.slow
def test_compiled_training_matches_eager_and_its_checkpoint_is_an_eager_models(small):
    """compile=on trains the same model as eager (up to kernel rounding), records that it compiled, and its
    checkpoint (same state_dict keys) loads into an eager model and continues."""
    from fer_tune.device import use_compile

    # 256 images in batches of 64, 32 validation images: fixed shapes, one graph per mode
    splits = _Splits(
        {"train": tuple(a[:256] for a in small.arrays("train")), "val": tuple(a[:32] for a in small.arrays("val"))}
    )
    cfg = TrainConfig(**{**TINY, "batch_size": 64}, epochs=2, amp="off", threads=1)
    eager = fit(cfg, splits, device=CPU)
    compiled = fit(cfg.replace(compile="on"), splits, device=CPU)
    assert compiled.compiled and not eager.compiled and use_compile("off", CPU) is False
    for e, c in zip(eager.history, compiled.history):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=0.02)
        assert abs(c["val_acc"] - e["val_acc"]) <= 100 / 32 + 1e-6  # at most one of 32 images differs
    assert set(compiled.checkpoint["model"]) == set(eager.checkpoint["model"])
    more = fit(cfg.replace(epochs=3), splits, device=CPU, checkpoint=compiled.checkpoint)
    assert [h["epoch"] for h in more.history] == [1, 2, 3] and not more.compiled
    with pytest.raises(FerTuneError, match=r"compile='yes' is not one of off, on, auto"):
        TrainConfig(compile="yes")


def test_optimizers_use_fused_kernels_on_cuda_only():
    from fer_tune.optim import create_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("sgd_nesterov", "adam", "adamw"):
        cfg = TrainConfig(optimizer=name)
        assert not create_optimizer(cfg, params, CPU).defaults.get("fused")
        # the flag a CUDA run gets (torch accepts fused=True for CPU tensors too, so it can be built here)
        assert create_optimizer(cfg, params, torch.device("cuda")).defaults["fused"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_batch_loop_never_waits_for_the_gpu():
    """torch.cuda.set_sync_debug_mode warns at every host-device sync: a run with three times the batches per epoch
    syncs exactly as often (the syncs are per epoch: the loss, the validation), so the batch loop has none."""
    import warnings

    dev = torch.device("cuda")
    x = np.random.default_rng(0).integers(0, 256, (192, 48, 48), dtype=np.uint8)
    y = np.arange(192) % 7

    def syncs(n: int) -> int:
        data = _Splits({"train": (x[:n], y[:n]), "val": (x[:32], y[:32])})
        cfg = TrainConfig(**{**TINY, "batch_size": 32}, epochs=1)
        fit(cfg, data, device=dev)  # warm-up: cuDNN's autotuner and the allocator
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fit(cfg, data, device=dev)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs(64) == syncs(192)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_runs_gpu_memory_peak_is_its_own_in_a_process_that_ran_a_bigger_one():
    """Tune runs trial after trial in one process (reuse_actors): each reports its own peak, not the process's."""
    dev = torch.device("cuda")
    x = np.random.default_rng(0).integers(0, 256, (128, 48, 48), dtype=np.uint8)
    data = _Splits({"train": (x, np.arange(128) % 7), "val": (x[:32], np.arange(32) % 7)})

    def peak(width: float) -> float:
        res = fit(TrainConfig(**{**TINY, "width": width, "batch_size": 64}, epochs=1), data, device=dev)
        return res.history[-1]["gpu_mem_mb"]

    big, small = peak(1.0), peak(0.0625)
    assert small < big / 4, (small, big)


def test_an_epochs_checkpoint_is_built_only_when_taken_and_only_then(small, monkeypatch):
    """fit() copies the run's state to the CPU for an epoch whose caller takes its checkpoint, and once more for the
    result at the end; a take() kept past its epoch is refused (the weights have moved on)."""
    from fer_tune import train

    built, real = [], train._Run.snapshot
    monkeypatch.setattr(
        train._Run,
        "snapshot",
        lambda self, cfg, prec, epoch, *a: built.append(epoch) or real(self, cfg, prec, epoch, *a),
    )
    takes = []

    def on_epoch(m, take):
        takes.append(take)
        if m["epoch"] == 2:
            assert take() is take() and take()["epoch"] == 2

    r = fit(TrainConfig(**TINY, epochs=3), small, device=CPU, on_epoch=on_epoch)
    assert built == [2, 3] and r.checkpoint["epoch"] == 3 and r.checkpoint is takes[2]()
    with pytest.raises(RuntimeError, match="taken inside on_epoch"):
        takes[0]()
    assert fit(TrainConfig(**TINY, epochs=3), small, device=CPU, checkpoint=r.checkpoint).checkpoint is r.checkpoint


def test_precise_bn_recomputes_the_statistics_of_the_current_weights():
    from fer_tune import precise_bn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5))
    model.train()
    batches = [torch.randn(8, 1, 6, 6) * 3 + 2 for _ in range(3)]
    bn = model[1]
    bn.running_mean.fill_(100.0)  # stale: statistics of weights that are gone
    assert precise_bn.recompute(model, iter(batches), None) == 3
    means = torch.stack([model[0](x).mean(dim=(0, 2, 3)) for x in batches]).mean(0)
    assert torch.allclose(bn.running_mean, means, atol=1e-5)  # the average of the batches' means
    assert model.training and bn.training and bn.momentum == 0.1  # modes and momentum put back
    before = bn.running_var.clone()
    precise_bn.recompute(model, iter(batches), None)
    assert torch.equal(bn.running_var, before)  # deterministic: no dropout, no random draws
    assert precise_bn.recompute(torch.nn.Linear(2, 2), iter(batches), None) == 0


def test_precise_bn_changes_validation_only_and_resumes_bit_exact(small):
    cfg = TrainConfig(**TINY, epochs=3, lr=0.05)
    plain = fit(cfg, small, device=CPU)
    precise = fit(cfg.replace(precise_bn=4), small, device=CPU)
    # training's random streams and batches are untouched (running statistics are not used in train mode)
    assert [h["train_loss"] for h in precise.history] == [h["train_loss"] for h in plain.history]
    assert [h["val_loss"] for h in precise.history] != [h["val_loss"] for h in plain.history]
    first = fit(cfg.replace(precise_bn=4), small, device=CPU, on_epoch=lambda m, s: m["epoch"] < 2)
    resumed = fit(cfg.replace(precise_bn=4), small, device=CPU, checkpoint=first.checkpoint)
    for k, v in precise.checkpoint["model"].items():
        assert torch.equal(v, resumed.checkpoint["model"][k]), k
    assert [h["val_acc"] for h in resumed.history] == [h["val_acc"] for h in precise.history]
    with pytest.raises(FerTuneError, match="precise_bn must be >= 0"):
        TrainConfig(precise_bn=-1)
