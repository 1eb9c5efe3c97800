"""Search spaces: search_spaces/*.yaml -> a validated StudySpec -> an Optuna define-by-run function.

A space is a YAML file, or the name of one that ships with fer-tune (`fer-tune sweep smoke`: the repository's
search_spaces/, package data). A space file (every key but ``space`` is optional; the defaults are the values
shown with `# default`)::

    name: joint                       # default: the file name
    description: what it reproduces   # default: none
    metric: val_acc                   # default; any per-epoch metric a trial reports
    mode: max                         # default; max | min
    sampler: tpe                      # default; tpe | random | grid | cmaes | qmc | nsga2
    seed: 0                           # default
    num_samples: 10                   # default; grid: default (and at most) the grid size
    max_epochs: 10                    # default; every trial's TrainConfig.epochs
    early_stopping: {type: asha, grace_period: 1, reduction_factor: 2}   # default; asha | median | none
    keep_checkpoints: 4               # default; once trials finish, the best checkpoint of the K best completed
                                      # trials is kept and the others emptied; all: every trial keeps its own
    warm_start: paper                 # default; trial 0 is the paper's recipe when the space can express it
                                      # (fer_tune.tune.study.warmstart); none: the sampler chooses every trial
    resources: {cpu: 1, gpu: 0}       # default; per trial; gpu may be a fraction (0.25 = four trials per GPU)
    data: {path: synthetic:1500, protocol: paper}   # default: --data, else synthetic, protocol paper
                                      # data: {required: true}: the study needs --data with real images
    fixed: {width: 0.5, train_crops: one}           # TrainConfig keys for every trial (default: the paper's)
    space:
      optimizer: {type: categorical, choices: [sgd_nesterov, adam]}
      lr: {type: float, low: 1.0e-4, high: 0.1, log: true}
      momentum: {type: float, low: 0.5, high: 0.99, when: {optimizer: [sgd, sgd_nesterov]}}
      batch_size: {type: int, low: 32, high: 128, step: 32}
      dropout: 0.3                    # a plain value: fixed

A parameter's name is the training key it sets, or any name with `key:` naming the training key: two
parameters may then set one key under disjoint conditions of the same parent, each with its own range::

      lr_sgd: {type: float, low: 3.0e-3, high: 0.1, log: true, key: lr, when: {optimizer: [sgd_nesterov]}}
      lr_adam: {type: float, low: 1.0e-4, high: 3.0e-3, log: true, key: lr, when: {optimizer: [adam]}}

Every value in a `when:` list must be one the parent can take (a choice, a fixed value, an int in range).

A multi-objective study lists its objectives, one mode each; the first is a training metric (it drives early
stopping, which needs one number), the others may be the cost metrics every trial reports (fer_tune.cost:
params, mflops, latency_ms)::

    metric: [val_acc, mflops]
    mode: [max, min]
    space:
      width: {type: categorical, choices: [0.25, 0.5, 1.0]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...common import NAME_RULE, FerTuneError, is_plain_name
from ...config import TrainConfig, coerce
from .spec import KEEP_DEFAULT, Param, StudySpec, parse_objectives

SAMPLERS = ("tpe", "random", "grid", "cmaes", "qmc", "nsga2")
STOPPERS = ("asha", "median", "none")
PARAM_TYPES = ("categorical", "float", "int", "fixed")
TOP_KEYS = (
    "name",
    "description",
    "metric",
    "mode",
    "sampler",
    "seed",
    "num_samples",
    "max_epochs",
    "early_stopping",
    "keep_checkpoints",
    "warm_start",
    "resources",
    "data",
    "fixed",
    "space",
)
# keys a space may not set per trial: the data protocol belongs to `data`, the length to `max_epochs`
NOT_SEARCHABLE = ("protocol", "epochs")


# ---------------------------------------------------------------------------------------------------------
# loading and validation
# ---------------------------------------------------------------------------------------------------------
def shipped_spaces() -> dict[str, Any]:
    """{name: file} of the spaces that ship with fer-tune."""
    from ...common import shipped

    folder = shipped("search_spaces")
    return {f.name[:-5]: f for f in folder.iterdir() if f.name.endswith(".yaml")} if folder.is_dir() else {}


def find_space(path: str | Path) -> Path:
    """The space file: `path` itself, else the shipped space of that name (`smoke` or `smoke.yaml`)."""
    p = Path(path)
    if p.is_file():
        return p
    name = str(path)[:-5] if str(path).endswith(".yaml") else str(path)
    shipped = shipped_spaces()
    if "/" not in name and name in shipped:
        return Path(str(shipped[name]))
    if p.is_dir():
        raise FerTuneError(f"{path} is a directory, not a search space file (a YAML file, or a shipped space's name)")
    raise FerTuneError(
        f"search space file {path} does not exist; the spaces that ship with fer-tune, usable by "
        f"name (with or without .yaml): {', '.join(f'{n}.yaml' for n in sorted(shipped)) or 'none'}"
    )


def load_space(path: str | Path) -> StudySpec:
    """The validated spec of a space file (or of a shipped space, by name)."""
    import yaml

    path = find_space(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise FerTuneError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FerTuneError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    return parse_space(raw, source=str(path), text=text, default_name=path.stem)


def parse_space(raw: Any, *, source: str, text: str = "", default_name: str = "study") -> StudySpec:
    def err(msg: str) -> FerTuneError:
        return FerTuneError(f"{source}: {msg}")

    if not isinstance(raw, dict):
        raise err("a search space file must be a mapping with at least a `space:` key")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise err(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(TOP_KEYS)}")

    def get(key, kind, default, check=None, what=""):
        value = raw.get(key, default)
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise err(f"{key} must be an integer, got {value!r}")
        if kind is str and not isinstance(value, str):
            raise err(f"{key} must be a string, got {value!r}")
        if kind is dict and not isinstance(value, dict):
            raise err(f"{key} must be a mapping, got {value!r}")
        if check is not None and not check(value):
            raise err(f"{key}={value!r}: {what}")
        return value

    # the file name is only a default: a sweep with --name may use any file
    name = get("name", str, default_name, lambda v: "name" not in raw or is_plain_name(v), NAME_RULE)
    spec = StudySpec(name=name, source=source, text=text)
    spec.description = get("description", str, "")
    spec.metrics, spec.modes = parse_objectives(raw.get("metric", "val_acc"), raw.get("mode", "max"), err)
    spec.sampler = get("sampler", str, "tpe", lambda v: v in SAMPLERS, f"must be one of {', '.join(SAMPLERS)}")
    spec.seed = get("seed", int, 0, lambda v: v >= 0, "must be >= 0")
    spec.max_epochs = get("max_epochs", int, 10, lambda v: v >= 1, "must be >= 1")
    spec.fixed = _parse_fixed(get("fixed", dict, {}), err)
    spec.space = _parse_params(raw.get("space"), err)
    spec.data = _parse_data(get("data", dict, {}), err)
    spec.resources = _parse_resources(get("resources", dict, {}), err)
    spec.early_stopping = _parse_stopping(get("early_stopping", dict, {"type": "asha"}), spec.max_epochs, err)
    keep = raw.get("keep_checkpoints", KEEP_DEFAULT)
    if keep != "all" and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
        raise err(f"keep_checkpoints must be an integer >= 0 or all, got {keep!r}")
    spec.keep_checkpoints = keep
    spec.warm_start = get("warm_start", str, "paper", lambda v: v in ("paper", "none"), "must be paper or none")

    if spec.sampler == "grid":
        bad = [p.name for p in spec.space.values() if p.type in ("float", "int")]
        if bad:
            raise err(
                f"sampler grid needs categorical parameters; {', '.join(bad)} are ranges "
                "(list the values as `choices:`)"
            )
        cond = [p.name for p in spec.space.values() if p.when and p.type == "categorical"]
        if cond:
            raise err(
                f"sampler grid cannot search conditional parameters ({', '.join(cond)}); give them fixed "
                "values or split the grid into several files"
            )
        size = spec.grid_size()
        spec.num_samples = get(
            "num_samples", int, size, lambda v: 1 <= v <= size, f"must be 1..{size} (the grid has {size} points)"
        )
    else:
        spec.num_samples = get("num_samples", int, 10, lambda v: v >= 1, "must be >= 1")
        if not any(p.type != "fixed" for p in spec.space.values()):
            raise err(f"sampler {spec.sampler}: the space has nothing to search (only fixed values)")
    if spec.sampler == "cmaes" and spec.multi:
        raise err(
            "sampler cmaes optimises one objective; a multi-objective study takes tpe, nsga2, random, grid or qmc"
        )
    if spec.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise err("sampler cmaes needs the `cmaes` package (pip install cmaes)") from None

    # every value the space can produce must make a valid TrainConfig (names, ranges), checked now, not in trial 7
    base = spec.base_config()
    for p in spec.space.values():
        values = {"categorical": p.choices, "fixed": [p.value], "float": [p.low, p.high], "int": [p.low, p.high]}
        for v in values[p.type]:
            try:
                TrainConfig.from_dict({**base, p.key: v}, source="")
            except FerTuneError as exc:
                raise err(f"space.{p.name}: value {v!r} is invalid ({str(exc).removeprefix('config: ')})") from None
    return spec


def _parse_fixed(fixed: dict, err) -> dict:
    bad = [k for k in fixed if k in NOT_SEARCHABLE]
    if bad:
        raise err(f"fixed.{bad[0]}: set {'max_epochs' if bad[0] == 'epochs' else 'data.protocol'} instead")
    unknown = [k for k in fixed if k not in TrainConfig.keys()]
    if unknown:
        raise err(f"fixed: unknown training key(s) {', '.join(unknown)}; valid: {', '.join(TrainConfig.keys())}")
    try:
        return {k: coerce(k, v, source=f"fixed.{k}") for k, v in fixed.items()}
    except FerTuneError as exc:
        raise err(str(exc)) from None


def _parse_params(space: Any, err) -> dict[str, Param]:
    if not isinstance(space, dict) or not space:
        raise err("`space:` must be a non-empty mapping of training key -> parameter")
    out: dict[str, Param] = {}
    for name, body in space.items():
        where = f"space.{name}"
        if name in NOT_SEARCHABLE:
            raise err(
                f"{where}: {name} cannot be searched ({'max_epochs sets it' if name == 'epochs' else 'set data.protocol'})"
            )
        if not isinstance(body, dict):
            body = {"type": "fixed", "value": body}
        body = dict(body)
        key = body.pop("key", name)
        if key not in TrainConfig.keys() or key in NOT_SEARCHABLE:
            what = f"key {key!r} is not a searchable training key" if key != name else "unknown training key"
            raise err(
                f"{where}: {what}; valid: {', '.join(k for k in TrainConfig.keys() if k not in NOT_SEARCHABLE)}"
                + ("" if key != name else " (or give `key:` naming the training key it sets)")
            )
        kind = body.pop("type", None)
        if kind is None:
            known = {"key", "when", "choices", "low", "high", "log", "step", "value"}
            odd = sorted(set(body) - known)
            raise err(
                f"{where}: no `type:` (one of {', '.join(PARAM_TYPES)})"
                + (f"; unknown field(s) {', '.join(odd)} (a misspelt type?)" if odd else "")
            )
        if kind not in PARAM_TYPES:
            raise err(f"{where}: type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
        when = body.pop("when", {}) or {}
        if not isinstance(when, dict):
            raise err(f"{where}.when must be a mapping like {{optimizer: [sgd, sgd_nesterov]}}")
        for parent, vals in list(when.items()):
            if parent not in out:
                raise err(f"{where}.when: {parent!r} must be a parameter defined above {name}")
            try:
                when[parent] = [
                    coerce(out[parent].key, v, source=f"{where}.when.{parent}")
                    for v in (vals if isinstance(vals, list) else [vals])
                ]
            except FerTuneError as exc:
                raise err(str(exc)) from None
            never = [v for v in when[parent] if not _can_take(out[parent], v)]
            if never:
                raise err(
                    f"{where}.when.{parent}: {parent} can never be {', '.join(map(repr, never))} "
                    f"({_values_of(out[parent])})"
                )
        allowed = {
            "categorical": {"choices"},
            "float": {"low", "high", "log", "step"},
            "int": {"low", "high", "log", "step"},
            "fixed": {"value"},
        }[kind]
        extra = sorted(set(body) - allowed)
        if extra:
            raise err(
                f"{where}: unknown field(s) {', '.join(extra)} for type {kind} (allowed: {', '.join(sorted(allowed))})"
            )
        p = Param(name=name, type=kind, when=when, key=key)
        if kind == "categorical":
            choices = body.get("choices")
            if not isinstance(choices, list) or not choices:
                raise err(f"{where}.choices must be a non-empty list")
            if len(set(map(repr, choices))) != len(choices):
                raise err(f"{where}.choices has duplicates: {choices}")
            try:
                p.choices = [coerce(key, c, source=where) for c in choices]
            except FerTuneError as exc:
                raise err(str(exc)) from None
        elif kind == "fixed":
            if "value" not in body:
                raise err(f"{where}: a fixed parameter needs `value:`")
            p.value = coerce(key, body["value"], source=where)
        else:
            num = int if kind == "int" else (int, float)
            for k in ("low", "high"):
                if k not in body or isinstance(body[k], bool) or not isinstance(body[k], num):
                    raise err(
                        f"{where}.{k} must be {'an integer' if kind == 'int' else 'a number'}, got {body.get(k)!r}"
                    )
            p.low, p.high = body["low"], body["high"]
            p.log = bool(body.get("log", False))
            p.step = body.get("step")
            if not p.low < p.high:
                raise err(f"{where}: low ({p.low}) must be below high ({p.high})")
            if p.log and p.low <= 0:
                raise err(f"{where}: log scale needs low > 0, got {p.low}")
            if p.log and p.step is not None and kind == "float":
                raise err(f"{where}: log and step cannot be combined")
            if p.step is not None and (isinstance(p.step, bool) or not isinstance(p.step, num) or p.step <= 0):
                raise err(f"{where}.step must be a positive {'integer' if kind == 'int' else 'number'}")
            if _TYPE_OF.get(key) == "int" and kind == "float":
                raise err(f"{where}: {key} is an integer setting; use type int")
            if _TYPE_OF.get(key) not in ("int", "float"):
                raise err(f"{where}: {key} is not numeric; use type categorical")
        for other in out.values():
            if other.key == key and not _exclusive(other, p):
                raise err(
                    f"{where}: sets {key} like space.{other.name}; two parameters may set one key only under "
                    "disjoint `when:` values of the same parent"
                )
        out[name] = p
    return out


def _can_take(p: Param, value: Any) -> bool:
    if p.type == "categorical":
        return value in p.choices
    if p.type == "fixed":
        return value == p.value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return p.low <= value <= p.high and (p.type == "float" or float(value).is_integer())


def _values_of(p: Param) -> str:
    if p.type == "categorical":
        return "choices: " + ", ".join(map(str, p.choices))
    if p.type == "fixed":
        return f"fixed at {p.value!r}"
    return f"range {p.low}..{p.high}"


def _exclusive(a: Param, b: Param) -> bool:
    """True when a and b can never be active in the same trial: disjoint values of a parent both depend on."""
    return any(not any(v in b.when[k] for v in a.when[k]) for k in set(a.when) & set(b.when))


_TYPE_OF = {k: type(v).__name__ for k, v in TrainConfig().to_dict().items()}


def _parse_data(data: dict, err) -> dict:
    unknown = sorted(set(data) - {"path", "protocol", "required"})
    if unknown:
        raise err(f"data: unknown key(s) {', '.join(unknown)} (allowed: path, protocol, required)")
    if not isinstance(data.get("required", False), bool):
        raise err(f"data.required must be true or false, got {data['required']!r}")
    if "protocol" in data and data["protocol"] not in ("paper", "standard"):
        raise err(f"data.protocol must be paper or standard, got {data['protocol']!r}")
    if "path" in data and not isinstance(data["path"], str):
        raise err(f"data.path must be a string, got {data['path']!r}")
    return dict(data)


def _parse_resources(res: dict, err) -> dict:
    unknown = sorted(set(res) - {"cpu", "gpu"})
    if unknown:
        raise err(f"resources: unknown key(s) {', '.join(unknown)} (allowed: cpu, gpu)")
    out = {"cpu": res.get("cpu", 1), "gpu": res.get("gpu", 0)}
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise err(f"resources.{k} must be a number >= 0, got {v!r}")
    if out["cpu"] == 0 and out["gpu"] == 0:
        raise err("resources: a trial needs cpu > 0 or gpu > 0")
    if out["gpu"] > 1 and out["gpu"] != int(out["gpu"]):
        raise err(f"resources.gpu: above 1 it must be a whole number of GPUs, got {out['gpu']}")
    return out


def _parse_stopping(es: dict, max_epochs: int, err) -> dict:
    kind = es.get("type", "asha")
    if kind == "pbt":
        raise err(
            "early_stopping.type pbt is not supported: PBT mutates configs itself and cannot share trials "
            "with an Optuna searcher; use asha or median"
        )
    if kind not in STOPPERS:
        raise err(f"early_stopping.type must be one of {', '.join(STOPPERS)}, got {kind!r}")
    allowed = {
        "asha": {"type", "grace_period", "reduction_factor"},
        "median": {"type", "grace_period"},
        "none": {"type"},
    }[kind]
    extra = sorted(set(es) - allowed)
    if extra:
        raise err(
            f"early_stopping: unknown field(s) {', '.join(extra)} for {kind} (allowed: {', '.join(sorted(allowed))})"
        )
    out = {"type": kind}
    if kind in ("asha", "median"):
        g = es.get("grace_period", 1)
        if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= max_epochs:
            raise err(f"early_stopping.grace_period must be an integer in 1..max_epochs ({max_epochs}), got {g!r}")
        out["grace_period"] = g
    if kind == "asha":
        rf = es.get("reduction_factor", 2)
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 1:
            raise err(f"early_stopping.reduction_factor must be a number > 1, got {rf!r}")
        out["reduction_factor"] = rf
    return out
