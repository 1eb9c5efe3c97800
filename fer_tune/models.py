"""The networks: the paper's VGG variant and three torchvision baselines, all 1x40x40 in, 7 logits out.

`vgg_variant` is exactly Khaireddin & Chen 2021 (usef-kh/fer `models/vgg.py`, 29,890,759 parameters): four stages
of (conv3x3 - BN - ReLU) x 2 + max-pool 2x2 (40 -> 20 -> 10 -> 5 -> 2), channels 64/128/256/512, then
FC 2048 -> 4096 -> 4096 -> 7 with Linear -> Dropout -> ReLU on the two hidden layers. Its module names match the
reference, so a reference state_dict loads as is. `width` scales every channel count and hidden size.

`vgg16`, `resnet50` and `efficientnet_b3` are torchvision's, randomly initialised, with a 1-channel first conv and
a `num_classes`-way head. `weights` may name a local state_dict of the original 3-channel ImageNet model: it is
loaded into that architecture, the first conv becomes the sum of its RGB kernels and the head starts fresh.
Nothing is ever downloaded.

`Ensemble` runs several trained networks as one model; `combine_logits` is how it combines them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import MODEL_NAMES, NUM_CLASSES, FerTuneError


# ---------------------------------------------------------------------------------------------------------
# the paper's network
# ---------------------------------------------------------------------------------------------------------
def _scale(n: int, width: float) -> int:
    return max(1, int(round(n * width)))


class VggVariant(nn.Module):
    """usef-kh/fer `Vgg` with a width multiplier (width 1 is the paper's network, same state_dict keys)."""

    def __init__(self, width: float = 1.0, dropout: float = 0.2, num_classes: int = NUM_CLASSES):
        super().__init__()
        c1, c2, c3, c4 = (_scale(c, width) for c in (64, 128, 256, 512))
        hidden = _scale(4096, width)
        for stage, (cin, cout) in enumerate([(1, c1), (c1, c2), (c2, c3), (c3, c4)], start=1):
            setattr(self, f"conv{stage}a", nn.Conv2d(cin, cout, 3, padding=1))
            setattr(self, f"conv{stage}b", nn.Conv2d(cout, cout, 3, padding=1))
            setattr(self, f"bn{stage}a", nn.BatchNorm2d(cout))
            setattr(self, f"bn{stage}b", nn.BatchNorm2d(cout))
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.lin1 = nn.Linear(c4 * 2 * 2, hidden)  # 40 -> 20 -> 10 -> 5 -> 2
        self.lin2 = nn.Linear(hidden, hidden)
        self.lin3 = nn.Linear(hidden, num_classes)
        self.drop = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in range(1, 5):
            for half in "ab":
                conv, bn = getattr(self, f"conv{stage}{half}"), getattr(self, f"bn{stage}{half}")
                x = F.relu(bn(conv(x)))
            x = self.pool(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.drop(self.lin1(x)))
        x = F.relu(self.drop(self.lin2(x)))
        return self.lin3(x)


# ---------------------------------------------------------------------------------------------------------
# local weights
# ---------------------------------------------------------------------------------------------------------
def load_tensor_file(file: Path, what: str, hint: str = "") -> Any:
    """torch.load(weights_only=True) on CPU with a clear error for a missing, truncated or foreign file."""
    if not file.is_file():
        raise FerTuneError(f"{what} {file} does not exist{hint}")
    kind = not_torch_file(file)
    if kind:
        raise FerTuneError(f"{what} {file} cannot be read: it is {kind}, not a file torch.save wrote")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors on a truncated or foreign file
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise FerTuneError(f"{what} {file} cannot be read ({exc.__class__.__name__}: {first})") from None


_MAGIC = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image", b"BM": "a BMP image"}


def not_torch_file(file: Path) -> str:
    """What a file is when it is plainly not a torch.save file (a zip archive since PyTorch 1.6): '' otherwise."""
    import zipfile

    if zipfile.is_zipfile(file):
        return ""
    with file.open("rb") as fh:
        head = fh.read(4096)
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    if head[:2] == b"\x1f\x8b":
        return "a gzip file"
    if not head:
        return "an empty file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return ""  # binary: let torch.load judge it (a legacy pickle checkpoint)
    return "a text file"


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from a local file; also accepts a checkpoint dict holding one under model/params/state_dict."""
    file = Path(path).expanduser()
    data = load_tensor_file(file, "weights file", " (weights are never downloaded; give a local file)")
    if isinstance(data, dict):
        for key in ("model", "params", "state_dict"):  # fer_tune checkpoint, usef-kh/fer checkpoint, Lightning...
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise FerTuneError(f"weights file {file} does not hold a state_dict (a dict of parameter name -> tensor)")
    return data


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str, what: str, **kw) -> None:
    try:
        model.load_state_dict(state, strict=True, **kw)
    except RuntimeError as exc:
        raise FerTuneError(f"weights file {path} does not fit {what}: {exc}") from None


def _vgg_variant(*, width: float, dropout: float, num_classes: int, weights: str | None) -> nn.Module:
    model = VggVariant(width, dropout, num_classes)
    if weights:
        _load_strict(model, _read_state_dict(weights), weights, f"vgg_variant (width {width}, {num_classes} classes)")
    return model


# ---------------------------------------------------------------------------------------------------------
# torchvision baselines
# ---------------------------------------------------------------------------------------------------------
# name -> (kwarg for the head dropout or None, first conv, head Linear) as module paths; the builder is
# torchvision.models.<name>, imported when one is built (torchvision's import costs about a second)
_TORCHVISION: dict[str, tuple[str | None, str, str]] = {
    "vgg16": ("dropout", "features.0", "classifier.6"),
    "resnet50": (None, "conv1", "fc"),
    "efficientnet_b3": ("dropout", "features.0.0", "classifier.1"),
}


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _torchvision(name: str, *, width: float, dropout: float, num_classes: int, weights: str | None) -> nn.Module:
    if width != 1:
        raise FerTuneError(f"width is only supported for vgg_variant; {name} needs width 1 (got {width})")
    import torchvision

    builder = getattr(torchvision.models, name)
    dropout_kw, conv_path, head_path = _TORCHVISION[name]
    kwargs = {dropout_kw: dropout} if dropout_kw else {}
    model = builder(weights=None, num_classes=num_classes, **kwargs)  # torchvision's own init, new-size head

    # 1-channel first conv. Random init: channel 0 of torchvision's kaiming(fan_out) init has the same law.
    old = model.get_submodule(conv_path)
    conv = nn.Conv2d(
        1,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        old.groups,
        bias=old.bias is not None,
    )
    with torch.no_grad():
        conv.weight.copy_(old.weight[:, :1])
        if old.bias is not None:
            conv.bias.copy_(old.bias)
    _set_module(model, conv_path, conv)

    if weights:
        state = _read_state_dict(weights)
        with torch.device("meta"):  # validate keys and shapes against the original 3-channel, 1000-class model
            original = builder(weights=None)
        _load_strict(original, state, weights, f"torchvision {name} (the original 3-channel model)", assign=True)
        state = {k: v for k, v in state.items() if not k.startswith(head_path + ".")}
        state[conv_path + ".weight"] = state[conv_path + ".weight"].sum(dim=1, keepdim=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith(head_path + ".") for k in missing), (missing, unexpected)
    return model


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    def build(*, width: float, dropout: float, num_classes: int, weights: str | None) -> nn.Module:
        return _torchvision(name, width=width, dropout=dropout, num_classes=num_classes, weights=weights)

    build.__name__ = name
    return build


# ---------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------
MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg_variant": _vgg_variant,
    **{name: _torchvision_builder(name) for name in _TORCHVISION},
}
assert tuple(MODELS) == MODEL_NAMES, "fer_tune.common.MODEL_NAMES lists the models built here"


def create_model(
    name: str, *, width: float = 1.0, dropout: float = 0.2, num_classes: int = NUM_CLASSES, weights: str | None = None
) -> nn.Module:
    """A fresh model (train mode) for 1x40x40 input and `num_classes` logits; see the module docstring."""
    if name not in MODELS:
        raise FerTuneError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](width=width, dropout=dropout, num_classes=num_classes, weights=weights)


def count_params(model: nn.Module) -> int:
    """Number of parameters (BatchNorm running statistics are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters())


def model_table() -> list[dict]:
    """[{"name", "params"}] for every model at width 1 with 7 classes (built on the meta device: no memory)."""
    with torch.device("meta"):
        return [{"name": name, "params": count_params(create_model(name))} for name in MODELS]


# ---------------------------------------------------------------------------------------------------------
# ensembles
# ---------------------------------------------------------------------------------------------------------
def combine_logits(stacked: torch.Tensor) -> torch.Tensor:
    """Members' logits stacked on dim 0, (M, ..., classes) -> the log of the mean of their softmax, float32
    (..., classes): its softmax is the ensemble's probabilities, its argmax the ensemble's prediction."""
    return torch.logsumexp(F.log_softmax(stacked.float(), -1), 0) - math.log(stacked.shape[0])


class Ensemble(nn.Module):
    """Trained networks as one model: the same input to every member, their outputs combined by combine_logits."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise FerTuneError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_logits(torch.stack([m(x) for m in self.members]))
