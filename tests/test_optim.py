"""fer_tune.optim: every optimizer steps, every schedule moves the lr as documented, state round-trips."""

import io
import math

import pytest
import torch

from fer_tune.common import FerTuneError
from fer_tune.config import OPTIMIZERS, SCHEDULERS, TrainConfig
from fer_tune.optim import Scheduler, create_optimizer

torch.set_num_threads(1)


def make(steps_per_epoch=1, **cfg_kw):
    torch.manual_seed(0)
    cfg = TrainConfig(**{"lr": 0.1, "epochs": 4, **cfg_kw})
    model = torch.nn.Linear(4, 3)
    optimizer = create_optimizer(cfg, model.parameters())
    return model, optimizer, Scheduler(cfg, optimizer, steps_per_epoch)


def train_step(model, optimizer):
    x = torch.randn(8, 4)
    loss = torch.nn.functional.cross_entropy(model(x), torch.arange(8) % 3)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps(name):
    model, optimizer, _ = make(optimizer=name)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, optimizer)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_optimizer_settings():
    _, sgd, _ = make(optimizer="sgd_nesterov", momentum=0.8, weight_decay=1e-3)
    group = sgd.param_groups[0]
    assert (group["nesterov"], group["momentum"], group["weight_decay"]) == (True, 0.8, 1e-3)
    _, ams, _ = make(optimizer="amsgrad")
    assert ams.param_groups[0]["amsgrad"] is True
    with pytest.raises(FerTuneError, match="momentum"):
        make(optimizer="sgd_nesterov", momentum=0.0)


def epoch_lrs(sched, accs):
    out = []
    for acc in accs:
        sched.after_batch()
        sched.after_epoch(acc)
        out.append(sched.lr)
    return out


def test_constant():
    _, _, sched = make(scheduler="constant")
    assert epoch_lrs(sched, [1, 2, 3]) == [0.1] * 3


def test_rlrp_reduces_after_patience():
    _, _, sched = make(scheduler="rlrp", factor=0.5, patience=2)
    # epoch 1 sets the best; the 3rd epoch without improvement (patience + 1) cuts the lr
    lrs = epoch_lrs(sched, [50.0, 50.0, 49.0, 50.0, 60.0, 60.0, 60.0, 60.0])
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025])


def test_cosine_reaches_eta_min():
    _, _, sched = make(scheduler="cosine", epochs=4, eta_min=0.001)
    lrs = epoch_lrs(sched, [0] * 4)
    assert lrs[1] == pytest.approx((0.1 + 0.001) / 2)
    assert lrs[-1] == pytest.approx(0.001)
    assert lrs == sorted(lrs, reverse=True)


def test_cosine_warm_restarts():
    _, _, sched = make(scheduler="cosine_wr", t_0=2, t_mult=2, eta_min=0.0)
    lrs = epoch_lrs(sched, [0] * 6)
    assert lrs == pytest.approx(
        [0.05, 0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05, 0.1 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.1]
    )


def test_step():
    _, _, sched = make(scheduler="step", step_size=2, gamma=0.1)
    assert epoch_lrs(sched, [0] * 5) == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001])


def test_onecycle_steps_per_batch():
    model, optimizer, sched = make(scheduler="onecycle", steps_per_epoch=5, epochs=2)
    assert sched.lr == pytest.approx(0.1 / 25)
    lrs = []
    for _ in range(2):
        for _ in range(5):
            train_step(model, optimizer)
            sched.after_batch()
            lrs.append(sched.lr)
        sched.after_epoch(0.0)
        assert sched.lr == lrs[-1]  # nothing per epoch
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 1  # warm-up ends at step 0.3 * 10 - 1 = 2
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4)
    sched.after_batch()  # one call too many is harmless
    assert sched.lr == lrs[-1]


def test_onecycle_without_momentum_optimizer():
    _, optimizer, sched = make(scheduler="onecycle", optimizer="adagrad", steps_per_epoch=3)
    sched.after_batch()
    assert "momentum" not in optimizer.param_groups[0]


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # as train.py reads checkpoints


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_state_round_trip(kind):
    kw = dict(scheduler=kind, epochs=6, patience=1, factor=0.5, t_0=2, step_size=2, eta_min=0.001, steps_per_epoch=3)
    accs = [10.0, 20.0, 20.0, 15.0, 25.0, 25.0]

    def run(model, optimizer, sched, epochs):
        lrs = []
        for epoch in epochs:
            for _ in range(3):
                train_step(model, optimizer)
                sched.after_batch()
                lrs.append(sched.lr)
            sched.after_epoch(accs[epoch])
            lrs.append(sched.lr)
        return lrs

    model, optimizer, sched = make(**kw)
    run(model, optimizer, sched, range(3))
    saved = save_load(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict()}
    )
    expected = run(model, optimizer, sched, range(3, 6))

    model, optimizer, sched = make(**kw)  # fresh objects, as train.py builds them on resume
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    assert run(model, optimizer, sched, range(3, 6)) == expected
    if kind != "constant":
        assert len(set(expected)) > 1

    _, _, other = make(scheduler="constant" if kind != "constant" else "step")
    with pytest.raises(FerTuneError, match="scheduler"):
        other.load_state_dict(saved["scheduler"])
