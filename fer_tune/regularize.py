"""What fit() can add to the paper's recipe: label smoothing, mixup / cutmix, a weight EMA, airbench's alternating
flip and no weight decay on 1-d parameters. Every one is off at its TrainConfig default (the paper's behaviour).

- Label smoothing (Szegedy et al. 2016): ``F.cross_entropy(..., label_smoothing=s)``.
- Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), batched on the device after the paper's augmentation:
  the batch's images are paired with a permutation of themselves, every crop of image i with the same crop of
  its partner, so TenCrop's ten crops of one image keep one pair of labels. Mixup blends the crops with
  lam ~ Beta(a, a); CutMix pastes one box of the partner (area 1 - lam, lam ~ Beta(a, a)) into every crop and
  sets lam to the box's exact share. With both on, each mixed batch takes one of them at random (timm's
  ``switch_prob`` 0.5); ``mix_p`` is the probability that a batch is mixed at all. The loss is
  lam * CE(y_a) + (1 - lam) * CE(y_b); the train accuracy counts lam for agreeing with y_a and 1 - lam for y_b
  (the expected accuracy under the mixed target), so it stays comparable with an unmixed run.
  The draws (mixed or not, which, lam, the box) come from a NumPy generator seeded by (seed, epoch, step), the
  partner permutation from the loop's torch generator: a resumed run repeats them exactly.
- Weight EMA (as timm's ModelEmaV3, EmoNeXt; airbench's Lookahead-style EMA): every ``ema_every`` steps
  ema = d * ema + (1 - d) * weights over every floating-point entry of the state_dict (BatchNorm's running
  statistics included; counters are copied), with d = min(ema, (1 + n) / (10 + n)) after n updates (the
  warm-up of TensorFlow's ExponentialMovingAverage), so that a short run is not dominated by its initial weights.
  Validation, the best-val checkpoint and the exported model use the EMA weights.
- Alternating flip (Keller Jordan, cifar10-airbench): each training image gets one random flip bit from the run's
  seed; epoch 1 flips the images whose bit is set, epoch 2 the others, and so on, so that every image is seen
  both ways within two epochs (random flips leave a quarter of them unmirrored over two epochs).
- ``no_wd_1d`` (as nanoGPT's ``configure_optimizers``): biases and BatchNorm weights get no weight decay.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig

MIX_SWITCH_P = 0.5  # with mixup and cutmix both on: the chance a mixed batch uses cutmix


def mixes(cfg: TrainConfig) -> bool:
    return cfg.mix_p > 0 and (cfg.mixup > 0 or cfg.cutmix > 0)


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, n_crops: int, cfg: TrainConfig, gen: torch.Generator, key: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(x, y_a, y_b, lam) for one training batch x of B * n_crops crops (image-major) and their labels y; a batch
    left unmixed comes back as (x, y, y, 1.0). `key` (seed, epoch, step) seeds the batch's own draws."""
    rng = np.random.default_rng(key)
    if not mixes(cfg) or rng.random() >= cfg.mix_p:
        return x, y, y, 1.0
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup <= 0 or rng.random() < MIX_SWITCH_P)
    alpha = cfg.cutmix if use_cutmix else cfg.mixup
    lam = float(rng.beta(alpha, alpha))
    B = x.shape[0] // n_crops
    perm = torch.randperm(B, generator=gen, device=x.device)
    partner = (perm[:, None] * n_crops + torch.arange(n_crops, device=x.device)).reshape(-1)
    if use_cutmix:
        H, W = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        h, w = int(H * cut), int(W * cut)
        ci, cj = int(rng.integers(H)), int(rng.integers(W))
        i0, i1 = max(ci - h // 2, 0), min(ci + h // 2 + h % 2, H)
        j0, j1 = max(cj - w // 2, 0), min(cj + w // 2 + w % 2, W)
        x = x.clone()
        x[..., i0:i1, j0:j1] = x[partner][..., i0:i1, j0:j1]
        lam = 1.0 - (i1 - i0) * (j1 - j0) / (H * W)
    else:
        x = x.mul(lam).add_(x[partner], alpha=1.0 - lam)
    return x, y, y[partner], lam


def mixed_loss(
    logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float, smoothing: float
) -> torch.Tensor:
    loss = F.cross_entropy(logits, y_a, label_smoothing=smoothing)
    if lam < 1.0:
        loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits, y_b, label_smoothing=smoothing)
    return loss


def mixed_correct(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float) -> torch.Tensor:
    """Correct predictions under the mixed target: lam per agreement with y_a, 1 - lam with y_b (a float sum)."""
    pred = logits.argmax(1)
    if lam >= 1.0:
        return (pred == y_a).sum()
    return lam * (pred == y_a).sum() + (1.0 - lam) * (pred == y_b).sum()


class WeightEMA:
    """An exponential moving average of a model's state_dict (see the module docstring for the decay)."""

    def __init__(self, model: torch.nn.Module, decay: float, every: int = 1):
        self.decay, self.every = decay, every
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0
        self.steps = 0
        self._source: torch.nn.Module | None = None  # the model whose tensors _pairs holds
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def step(self, model: torch.nn.Module) -> None:
        """Call after every optimizer step: every `every`-th call folds the model's weights into the average."""
        self.steps += 1
        if self.steps % self.every:
            return
        if self._source is not model:  # state_dict()'s tensors are the live ones (load_state_dict copies into them)
            self._source = model
            self._pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))
        d = self.current_decay()
        for ema, cur in self._pairs:
            if ema.dtype.is_floating_point:
                ema.lerp_(cur, 1.0 - d)
            else:  # BatchNorm's num_batches_tracked
                ema.copy_(cur)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates, "steps": self.steps}

    def load_state_dict(self, state: dict, weights: dict) -> None:
        self.model.load_state_dict(weights)
        self.updates, self.steps = int(state["updates"]), int(state["steps"])


def flip_bits(n_train: int, seed: int, device: torch.device) -> torch.Tensor:
    """Each training image's flip bit for flip=alternate (bool (n_train,)), from the seed alone."""
    g = torch.Generator(device="cpu").manual_seed(seed + 0x5EED)
    return (torch.rand(n_train, generator=g) < 0.5).to(device)


def alternate_flips(bits: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """The flips of the batch `idx` in `epoch` (1-based): the set bits on odd epochs, the others on even ones."""
    return bits[idx] ^ (epoch % 2 == 0)


def param_groups(model: torch.nn.Module, weight_decay: float, no_wd_1d: bool) -> list[dict] | list:
    """The optimizer's parameters: one group, or with no_wd_1d the >= 2-d weights (decayed) and the biases and
    normalisation weights (not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not no_wd_1d:
        return params
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


class Additions:
    """fit()'s hooks for the additions a config turns on; with none on (the paper's recipe) each is a no-op.
    Create it once the starting weights are in the model; a checkpoint's "model" holds the evaluated weights (the
    EMA's when it is on), "train_model" and "ema" what a resume needs besides."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, n_train: int, device: torch.device):
        self.cfg = cfg
        self.ema = WeightEMA(model, cfg.ema, cfg.ema_every) if cfg.ema > 0 else None
        self.bits = flip_bits(n_train, cfg.seed, device) if cfg.flip == "alternate" else None

    def resume(self, checkpoint: dict, model: torch.nn.Module) -> None:
        if self.ema is not None:
            model.load_state_dict(checkpoint["train_model"])
            self.ema.load_state_dict(checkpoint["ema"], checkpoint["model"])

    def flips(self, idx: torch.Tensor, epoch: int) -> torch.Tensor | None:
        return None if self.bits is None else alternate_flips(self.bits, idx, epoch)

    def mix(self, x: torch.Tensor, y: torch.Tensor, n_crops: int, gen: torch.Generator, key: tuple[int, ...]):
        return mix_batch(x, y, n_crops, self.cfg, gen, key) if mixes(self.cfg) else (x, y, y, 1.0)

    def after_step(self, model: torch.nn.Module) -> None:
        if self.ema is not None:
            self.ema.step(model)

    def evaluated(self, model: torch.nn.Module) -> torch.nn.Module:
        """The weights that are validated, selected and exported."""
        return model if self.ema is None else self.ema.model

    def state(self, model: torch.nn.Module) -> dict:
        """A checkpoint's entries beyond the evaluated weights (state_dicts on the device; the caller copies)."""
        if self.ema is None:
            return {}
        return {"train_model": model.state_dict(), "ema": self.ema.state_dict()}
