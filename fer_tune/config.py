"""TrainConfig: the one typed config that holds every training setting.

The search spaces (search_spaces/*.yaml) name these same keys; results record the whole config.
Defaults are the paper's (Khaireddin & Chen 2021, usef-kh/fer).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .common import MODEL_NAMES, FerTuneError

OPTIMIZERS = ("sgd", "sgd_nesterov", "asgd", "adam", "amsgrad", "adamw", "adadelta", "adagrad")
SCHEDULERS = ("constant", "rlrp", "cosine", "cosine_wr", "onecycle", "step")
CROPS_TRAIN = ("ten", "one")
CROPS_TEST = ("ten", "center")
FLIPS = ("random", "alternate")
PROTOCOLS = ("paper", "standard")
AMP_MODES = ("auto", "bf16", "off")
COMPILE_MODES = ("off", "on", "auto")


@dataclass
class TrainConfig:
    # model
    model: str = "vgg_variant"
    width: float = 1.0
    dropout: float = 0.2
    weights: str = ""  # optional local state_dict to start from (never downloaded)
    # optimizer
    optimizer: str = "sgd_nesterov"
    lr: float = 0.01
    momentum: float = 0.9  # sgd-family only
    weight_decay: float = 1e-4
    # scheduler and its parameters
    scheduler: str = "rlrp"
    factor: float = 0.75  # rlrp: lr *= factor when val_acc plateaus
    patience: int = 5  # rlrp
    t_0: int = 10  # cosine_wr: first restart period (epochs)
    t_mult: int = 1  # cosine_wr
    step_size: int = 30  # step (epochs)
    gamma: float = 0.1  # step
    eta_min: float = 0.0  # cosine, cosine_wr: final lr
    # data and loop
    batch_size: int = 64
    epochs: int = 300
    train_crops: str = "ten"
    test_crops: str = "ten"
    erase_p: float = 0.5  # RandomErasing probability per crop (paper: 0.5)
    protocol: str = "paper"
    seed: int = 0
    amp: str = "auto"  # auto: bf16 on CUDA (fp16 + GradScaler pre-Ampere) and on CPUs with native bf16; bf16; off
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    compile: str = "off"  # torch.compile the model: off | on | auto (what measured faster on the device type)
    eval_batch_size: int = 0  # images per evaluation forward pass; 0 = auto (see train.eval_images_per_batch)
    precise_bn: int = 0  # BatchNorm statistics recomputed over N training batches before each validation; 0 = off
    # beyond the paper (fer_tune.regularize); each off by default
    label_smoothing: float = 0.0  # cross-entropy label smoothing, 0 .. 0.3
    mixup: float = 0.0  # mixup Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0  # cutmix Beta(alpha, alpha); 0 = off
    mix_p: float = 1.0  # probability that a batch is mixed (when mixup or cutmix is on)
    ema: float = 0.0  # weight EMA decay per update, 0 = off (evaluation and exports use the EMA weights)
    ema_every: int = 1  # optimizer steps between EMA updates
    flip: str = "random"  # random (the paper's RandomHorizontalFlip) | alternate (cifar10-airbench's)
    no_wd_1d: bool = False  # no weight decay on biases and normalisation weights

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------------------
    def validate(self) -> None:
        def choice(key: str, allowed: tuple[str, ...] | list[str]) -> None:
            value = getattr(self, key)
            if value not in allowed:
                raise FerTuneError(f"config: {key}={value!r} is not one of {', '.join(allowed)}")

        def positive(key: str, allow_zero: bool = False) -> None:
            value = getattr(self, key)
            if value < 0 or (value == 0 and not allow_zero):
                raise FerTuneError(f"config: {key} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        choice("model", sorted(MODEL_NAMES))
        choice("optimizer", OPTIMIZERS)
        choice("scheduler", SCHEDULERS)
        choice("train_crops", CROPS_TRAIN)
        choice("test_crops", CROPS_TEST)
        choice("protocol", PROTOCOLS)
        choice("amp", AMP_MODES)
        choice("compile", COMPILE_MODES)
        choice("flip", FLIPS)
        for key in ("width", "lr", "batch_size", "epochs", "t_0", "t_mult", "step_size", "ema_every"):
            positive(key)
        for key in (
            "weight_decay",
            "momentum",
            "patience",
            "eta_min",
            "threads",
            "seed",
            "eval_batch_size",
            "precise_bn",
        ):
            positive(key, allow_zero=True)
        for key, low, high, upper in (
            ("label_smoothing", 0.0, 0.3, "]"),
            ("mixup", 0.0, 10.0, "]"),
            ("cutmix", 0.0, 10.0, "]"),
            ("mix_p", 0.0, 1.0, "]"),
            ("ema", 0.0, 1.0, ")"),
        ):
            value = getattr(self, key)
            if not (low <= value < high if upper == ")" else low <= value <= high):
                raise FerTuneError(f"config: {key} must be in [{low:g}, {high:g}{upper}, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise FerTuneError(f"config: dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.erase_p <= 1.0:  # a probability: 1 erases a patch of every crop
            raise FerTuneError(f"config: erase_p must be in [0, 1], got {self.erase_p!r}")
        if self.optimizer == "sgd_nesterov" and self.momentum <= 0:
            raise FerTuneError(
                "config: optimizer sgd_nesterov needs momentum > 0 (Nesterov momentum); use optimizer sgd for plain SGD"
            )
        if not 0.0 < self.factor < 1.0:
            raise FerTuneError(f"config: factor must be in (0, 1), got {self.factor!r}")
        if not 0.0 < self.gamma <= 1.0:
            raise FerTuneError(f"config: gamma must be in (0, 1], got {self.gamma!r}")

    # -- conversion -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        unknown = sorted(set(data) - set(cls.keys()))
        if unknown:
            raise FerTuneError(
                f"{source}: unknown key(s) {', '.join(unknown)}; valid keys are: {', '.join(cls.keys())}"
            )
        return cls(**{k: coerce(k, v, source=source) for k, v in data.items()})

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FerTuneError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
            raise FerTuneError(f"config file {path} is not valid {path.suffix.lstrip('.')}: {exc}") from None
        if not isinstance(data, dict):
            raise FerTuneError(f"config file {path} must hold a mapping of key: value")
        if "config" in data and isinstance(data["config"], dict):  # a metrics.json
            data = data["config"]
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def with_overrides(self, assignments: list[str]) -> TrainConfig:
        """Apply `--set key=value` strings."""
        changes: dict[str, Any] = {}
        for item in assignments:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise FerTuneError(f"--set expects key=value, got {item!r}")
            changes[key.strip()] = value.strip()
        return TrainConfig.from_dict({**self.to_dict(), **changes}, source="--set")


_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def coerce(key: str, value: Any, *, source: str = "config") -> Any:
    """Turn a value (maybe a string from --set or YAML) into the field's type, with a readable error."""
    kind = _TYPES.get(key)
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value), 10) if isinstance(value, str) else int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "str":
            return str(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            text = str(value).strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
            raise ValueError
    except (TypeError, ValueError):
        what = {"int": "an int", "float": "a float", "str": "a str", "bool": "true or false"}.get(str(kind), str(kind))
        raise FerTuneError(f"{source}: {key} must be {what}, got {value!r}") from None
    return value


# ---------------------------------------------------------------------------------------------------------
# a checkpoint's size, without building the model (the study's driver never imports torch)
# ---------------------------------------------------------------------------------------------------------
# torchvision's models at their one size, 1-channel input and the 7-way head (tests check them against torch)
TORCHVISION_PARAMS = {"vgg16": 134_288_071, "resnet50": 23_516_103, "efficientnet_b3": 10_706_271}
MOMENTS = {"sgd": 1, "sgd_nesterov": 1, "asgd": 1, "adam": 2, "amsgrad": 3, "adamw": 2, "adadelta": 2, "adagrad": 1}


def model_parameters(model: str, width: float, num_classes: int = 7) -> int:
    """The parameter count of a model of the zoo (fer_tune.models), computed from its layout."""
    if model != "vgg_variant":
        return TORCHVISION_PARAMS[model]
    c1, c2, c3, c4 = (max(1, int(round(n * width))) for n in (64, 128, 256, 512))
    hidden = max(1, int(round(4096 * width)))
    n, cin = 0, 1
    for c in (c1, c2, c3, c4):  # two 3x3 convs and two BatchNorms (weight and bias) per stage
        n += (cin * 9 + 1) * c + (c * 9 + 1) * c + 4 * c
        cin = c
    return n + (c4 * 4 + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * num_classes


def checkpoint_bytes(cfg: TrainConfig) -> int:
    """About the size of one training checkpoint of `cfg`: fp32 weights, the optimizer's per-parameter state and
    the EMA copy of the weights (ema > 0)."""
    params = model_parameters(cfg.model, cfg.width)
    return params * 4 * (1 + MOMENTS.get(cfg.optimizer, 2) + (cfg.ema > 0)) + 2**20
