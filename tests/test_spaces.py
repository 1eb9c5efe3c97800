"""Search space files: the shipped ones, conditionals, and every kind of bad input."""

import importlib.util
from pathlib import Path

import optuna
import pytest
import yaml

from fer_tune.cli import main
from fer_tune.common import FerTuneError
from fer_tune.tune.study.spaces import load_space, parse_space

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
OK = {"space": {"lr": {"type": "float", "low": 1e-4, "high": 0.1, "log": True}}}


def test_shipped_spaces_load_with_descriptions():
    names = sorted(p.stem for p in SPACES.glob("*.yaml"))
    assert names == [
        "architecture",
        "dropout",
        "fer2013_cpu",
        "joint",
        "optimizer",
        "pareto",
        "recipe",
        "scheduler",
        "smoke",
    ]
    sizes = {}
    for name in names:
        spec = load_space(SPACES / f"{name}.yaml")
        assert spec.name == name and len(spec.description) > 80, name
        if spec.sampler == "grid":
            sizes[name] = (spec.grid_size(), spec.num_samples)
    assert sizes == {"optimizer": (14, 14), "scheduler": (6, 6), "dropout": (4, 4), "architecture": (4, 4)}
    assert load_space(SPACES / "optimizer.yaml").max_epochs == 100
    joint = load_space(SPACES / "joint.yaml")
    assert (joint.sampler, joint.early_stopping["type"]) == ("tpe", "asha")
    pareto = load_space(SPACES / "pareto.yaml")
    assert (pareto.metrics, pareto.modes) == (["val_acc", "mflops"], ["max", "min"]) and pareto.data["required"]


def test_the_recipe_space_keeps_the_papers_optimizer_and_scheduler_and_searches_the_additions():
    spec = load_space(SPACES / "recipe.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2), direction="maximize")
    seen: dict[str, set] = {}
    for _ in range(40):
        t = study.ask()
        constants = spec.define_by_run()(t)
        cfg = spec.trial_config({**t.params, **constants})
        assert (cfg.optimizer, cfg.momentum, cfg.scheduler, cfg.factor, cfg.patience) == (
            "sgd_nesterov",
            0.9,
            "rlrp",
            0.75,
            5,
        )
        assert isinstance(cfg.no_wd_1d, bool) and cfg.flip in ("random", "alternate")
        for k in ("label_smoothing", "mixup", "cutmix", "ema", "flip", "no_wd_1d"):
            seen.setdefault(k, set()).add(getattr(cfg, k))
        study.tell(t, 1.0)
    assert all(len(v) > 1 for v in seen.values()), seen  # every addition is searched
    off = {"label_smoothing": 0.0, "mixup": 0.0, "cutmix": 0.0, "ema": 0.0, "flip": "random", "no_wd_1d": False}
    assert all(v in seen[k] for k, v in off.items())  # the paper's setting among the choices


def test_grid_covers_every_point():
    spec = load_space(SPACES / "optimizer.yaml")
    study = optuna.create_study(sampler=spec.make_sampler(), direction="maximize")
    seen = set()
    for _ in range(spec.num_samples):
        t = study.ask()
        spec.define_by_run()(t)
        seen.add((t.params["optimizer"], t.params["scheduler"]))
        if len(seen) < spec.num_samples:  # GridSampler stops the study after the last point
            study.tell(t, 1.0)
    assert len(seen) == 14


def test_an_extended_grid_study_visits_only_points_it_has_not_visited():
    """`extend` gives each run its own seed; a grid's sampler keeps the space's, so that it numbers the points as
    the sweep's sampler did and knows which were visited (with the run's seed, 8 trials held 7 points)."""
    spec = load_space(SPACES / "optimizer.yaml")
    storage = optuna.storages.InMemoryStorage()
    seen = []
    for run_seed in (spec.seed, spec.seed + 1000):  # the sweep's run, then an extend's
        study = optuna.create_study(
            study_name="g", storage=storage, sampler=spec.make_sampler(run_seed), load_if_exists=True
        )
        for _ in range(spec.num_samples // 2):
            t = study.ask()
            spec.define_by_run()(t)
            seen.append((t.params["optimizer"], t.params["scheduler"]))
            if len(seen) < 14:  # GridSampler stops the study after the last point
                study.tell(t, 1.0)
    assert len(seen) == 14 and len(set(seen)) == 14, seen


def test_conditional_parameters_only_where_they_apply():
    spec = load_space(SPACES / "joint.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1), direction="maximize")
    kinds = set()
    for _ in range(60):
        t = study.ask()
        constants = spec.define_by_run()(t)
        p = {**t.params, **constants}
        assert ("momentum" in p) == (p["optimizer"] in ("sgd", "sgd_nesterov"))
        assert ("factor" in p) == ("patience" in p) == (p["scheduler"] == "rlrp")
        assert ("t_0" in p) == (p["scheduler"] == "cosine_wr")
        cfg = spec.trial_config(p)
        assert cfg.epochs == 60 and 1e-4 <= cfg.lr <= 0.1 and cfg.batch_size in (32, 64, 128)
        kinds.add(p["scheduler"])
        study.tell(t, 1.0)
    assert kinds == {"rlrp", "cosine", "cosine_wr", "onecycle"}


BAD = [
    ([], "must be a mapping"),
    ({}, "`space:` must be a non-empty mapping"),
    ({**OK, "nmae": "x"}, "unknown key(s) nmae"),
    ({**OK, "sampler": "bayes"}, "sampler='bayes': must be one of tpe, random, grid, cmaes, qmc"),
    ({**OK, "mode": "maximize"}, "mode='maximize': must be max or min"),
    ({**OK, "metric": "accuracy"}, "metric='accuracy'"),
    ({**OK, "num_samples": 0}, "num_samples=0: must be >= 1"),
    ({**OK, "num_samples": "ten"}, "num_samples must be an integer"),
    ({**OK, "max_epochs": 0}, "max_epochs=0"),
    ({**OK, "early_stopping": {"type": "hyperband"}}, "early_stopping.type must be one of asha, median, none"),
    ({**OK, "early_stopping": {"type": "pbt"}}, "pbt is not supported"),
    (
        {**OK, "early_stopping": {"type": "asha", "grace_period": 50}},
        "grace_period must be an integer in 1..max_epochs",
    ),
    ({**OK, "early_stopping": {"type": "asha", "reduction_factor": 1}}, "reduction_factor must be a number > 1"),
    ({**OK, "early_stopping": {"type": "none", "grace_period": 2}}, "unknown field(s) grace_period for none"),
    ({**OK, "resources": {"gpu": -1}}, "resources.gpu must be a number >= 0"),
    ({**OK, "resources": {"gpu": 1.5}}, "whole number of GPUs"),
    ({**OK, "resources": {"cpu": 0}}, "needs cpu > 0 or gpu > 0"),
    ({**OK, "resources": {"tpu": 1}}, "resources: unknown key(s) tpu"),
    ({**OK, "data": {"protocol": "kaggle"}}, "data.protocol must be paper or standard"),
    ({**OK, "fixed": {"epochs": 5}}, "fixed.epochs: set max_epochs instead"),
    ({**OK, "fixed": {"widht": 0.5}}, "fixed: unknown training key(s) widht"),
    ({**OK, "fixed": {"width": "wide"}}, "width"),
    ({"space": {"lr": {"type": "float", "low": 0.1, "high": 0.01}}}, "space.lr: low (0.1) must be below high"),
    ({"space": {"lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}}, "log scale needs low > 0"),
    ({"space": {"lr": {"type": "float", "low": "a", "high": 0.1}}}, "space.lr.low must be a number"),
    ({"space": {"lr": {"type": "uniform", "low": 0.1, "high": 1}}}, "space.lr: type must be one of"),
    (
        {"space": {"lr": {"tpye": "float", "low": 0.1, "high": 1}}},
        "space.lr: no `type:` (one of categorical, float, int, fixed); unknown field(s) tpye (a misspelt type?)",
    ),
    ({"space": {"lr": {"type": "float", "min": 0.1, "max": 1}}}, "space.lr: unknown field(s) max, min"),
    ({"space": {"batch_size": {"type": "float", "low": 16, "high": 64}}}, "integer setting; use type int"),
    ({"space": {"optimizer": {"type": "int", "low": 1, "high": 3}}}, "not numeric; use type categorical"),
    ({"space": {"optimizer": {"type": "categorical", "choices": []}}}, "choices must be a non-empty list"),
    ({"space": {"optimizer": {"type": "categorical", "choices": ["adam", "adam"]}}}, "duplicates"),
    (
        {"space": {"optimizer": {"type": "categorical", "choices": ["adam", "rmsprop"]}}},
        "space.optimizer: value 'rmsprop' is invalid (optimizer='rmsprop' is not one of",
    ),
    ({"space": {"dropout": {"type": "float", "low": 0.0, "high": 1.5}}}, "space.dropout: value 1.5 is invalid"),
    ({"space": {"epochs": {"type": "int", "low": 1, "high": 5}}}, "epochs cannot be searched"),
    (
        {"space": {"learning_rate": {"type": "float", "low": 0.1, "high": 1}}},
        "space.learning_rate: unknown training key",
    ),
    (
        {"space": {"momentum": {"type": "float", "low": 0.5, "high": 0.9, "when": {"optimizer": ["sgd"]}}}},
        "space.momentum.when: 'optimizer' must be a parameter defined above momentum",
    ),
    ({"sampler": "grid", "space": {"lr": {"type": "float", "low": 0.1, "high": 1}}}, "grid needs categorical"),
    (
        {"sampler": "grid", "num_samples": 5, "space": {"dropout": {"type": "categorical", "choices": [0.1, 0.2]}}},
        "num_samples=5: must be 1..2 (the grid has 2 points)",
    ),
    ({"space": {"dropout": 0.3}}, "nothing to search"),
    ({**OK, "sampler": "cmaes"}, "needs the `cmaes` package"),
    ({**OK, "data": {"required": "yes"}}, "data.required must be true or false"),
    # a when: value the parent can never take
    (
        {
            "space": {
                "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
                "momentum": {"type": "float", "low": 0.5, "high": 0.9, "when": {"optimizer": ["sgd_nesterov"]}},
            }
        },
        "space.momentum.when.optimizer: optimizer can never be 'sgd_nesterov' (choices: sgd, adam)",
    ),
    (
        {
            "space": {
                "patience": {"type": "int", "low": 1, "high": 4},
                "factor": {"type": "float", "low": 0.5, "high": 0.9, "when": {"patience": [2, 9]}},
            }
        },
        "space.factor.when.patience: patience can never be 9 (range 1..4)",
    ),
    # two parameters setting one training key
    (
        {
            "space": {
                "lr_a": {"type": "float", "low": 0.01, "high": 0.1, "key": "lr"},
                "lr_b": {"type": "float", "low": 1e-4, "high": 1e-3, "key": "lr"},
            }
        },
        "space.lr_b: sets lr like space.lr_a; two parameters may set one key only under disjoint `when:` values",
    ),
    (
        {
            "space": {
                "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
                "lr_a": {"type": "float", "low": 0.01, "high": 0.1, "key": "lr", "when": {"optimizer": ["sgd"]}},
                "lr_b": {
                    "type": "float",
                    "low": 1e-4,
                    "high": 1e-3,
                    "key": "lr",
                    "when": {"optimizer": ["sgd", "adam"]},
                },
            }
        },
        "space.lr_b: sets lr like space.lr_a",
    ),
    (
        {
            "space": {
                "width": {"type": "categorical", "choices": [0.25, 1.0]},  # 1 and 1.0 are one value
                "lr_a": {"type": "float", "low": 0.01, "high": 0.1, "key": "lr", "when": {"width": [1]}},
                "lr_b": {"type": "float", "low": 1e-4, "high": 1e-3, "key": "lr", "when": {"width": [1.0]}},
            }
        },
        "space.lr_b: sets lr like space.lr_a",
    ),
    (
        {
            "space": {
                "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
                "momentum": {"type": "float", "low": 0.5, "high": 0.9, "when": {"optimizer": [[1]]}},
            }
        },
        "space.momentum.when.optimizer: optimizer can never be",
    ),
    (
        {"space": {"lr_a": {"type": "float", "low": 0.01, "high": 0.1, "key": "learning_rate"}}},
        "space.lr_a: key 'learning_rate' is not a searchable training key",
    ),
    (
        {"space": {"lr_a": {"type": "float", "low": 0.01, "high": 0.1, "key": "epochs"}}},
        "space.lr_a: key 'epochs' is not a searchable training key",
    ),
    (
        {"space": {"lr_a": {"type": "float", "low": 1.0, "high": 2.0, "key": "dropout"}}},
        "space.lr_a: value 1.0 is invalid (dropout must be in [0, 1)",
    ),
]


def test_two_parameters_set_one_key_under_disjoint_conditions():
    spec = load_space(SPACES / "fer2013_cpu.yaml")
    assert spec.renames() == {"lr_sgd": "lr", "lr_adamw": "lr"} and spec.data["required"] is True
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3), direction="maximize")
    seen = set()
    for _ in range(40):
        t = study.ask()
        constants = spec.define_by_run()(t) or {}
        p = {**t.params, **constants}
        cfg = spec.trial_config(p)
        if cfg.optimizer == "adamw":
            assert "lr_sgd" not in p and cfg.lr == p["lr_adamw"] and 2e-4 <= cfg.lr <= 3e-3
        else:
            assert "lr_adamw" not in p and cfg.lr == p["lr_sgd"] and 3e-3 <= cfg.lr <= 0.1
        assert cfg.width == 0.25 and cfg.epochs == 8 and cfg.train_crops == "one"
        seen.add(cfg.optimizer)
        study.tell(t, 1.0)
    assert seen == {"sgd_nesterov", "sgd", "adamw"}
    assert spec.to_dict()["space"]["lr_sgd"]["key"] == "lr"


def test_a_real_data_space_needs_data(tmp_path, capsys):
    for extra in ([], ["--data", "synthetic:500"]):
        assert main(["sweep", str(SPACES / "fer2013_cpu.yaml"), "--results", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert "is a study of real faces: pass --data PATH" in err and err.count("\n") == 1
    assert not (tmp_path / "fer2013_cpu").exists()


@pytest.mark.parametrize("raw,expected", BAD, ids=[e[:40] for _, e in BAD])
def test_bad_space_errors(raw, expected):
    if "cmaes" in expected and importlib.util.find_spec("cmaes"):
        pytest.skip("cmaes is installed here")
    with pytest.raises(FerTuneError) as info:
        parse_space(raw, source="bad.yaml")
    msg = str(info.value)
    assert msg.startswith("bad.yaml: ") and expected in msg, msg


def test_bad_files_through_the_cli(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {lr: [1, 2\n")
    assert main(["sweep", str(bad), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and str(bad) in err and err.count("\n") == 1
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "smoke.yaml" in err  # names the shipped spaces
    bad.write_text(yaml.safe_dump({"space": {"lr": {"type": "float", "low": 1, "high": 0.1}}}))
    assert main(["sweep", str(bad), "--results", str(tmp_path)]) == 2
    assert "low (1) must be below high (0.1)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing written for a refused space
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert "not a fer-tune study directory" in capsys.readouterr().err


def test_a_space_that_is_not_text_or_not_a_file_and_a_study_that_is_not_whole_are_one_line(tmp_path, capsys):
    """Files a user's tools damage or mix up: a space saved as UTF-16, a directory given as a space, a study.json
    cut down to `{}` or to bytes that are not text, a study without its copy of the space, a directory that holds
    only the SLURM job written for it: one line each, exit 2, no traceback."""

    def one_line(argv, *words):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fer-tune: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        for w in words:
            assert w in err, err

    space = tmp_path / "utf16.yaml"
    space.write_bytes("name: x\n".encode("utf-16"))
    one_line(["space", "check", space], "utf16.yaml: not a UTF-8 text file")
    one_line(["sweep", space, "--results", tmp_path / "r"], "not a UTF-8 text file")
    one_line(["space", "check", tmp_path], "is a directory, not a search space file")
    study = tmp_path / "s"
    study.mkdir()
    for text, why in (("{}", "it has no name, spec, runs"), ("[1]", "not a JSON object"), (b"\xff\xfe", "codec")):
        (study / "study.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        for command in ("status", "report", "resume", "extend"):
            extra = ["--num-samples", "1"] if command == "extend" else []
            one_line([command, study, *extra], "study.json is damaged", why, "cannot read the study from it")
    job = tmp_path / "results" / "smoke"
    job.mkdir(parents=True)
    (job / "slurm.sbatch").write_text("#!/bin/bash\n")
    one_line(["status", job], "holds a SLURM job's script (slurm.sbatch) but no study yet", "sbatch")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["status"], ["the following arguments are required: study", "(see fer-tune status --help)"]),
        (["report", "x", "--bogus"], ["unrecognized arguments: --bogus", "(see fer-tune report --help)"]),
        (["data", "check", "x", "--nope"], ["unrecognized arguments: --nope", "(see fer-tune data check --help)"]),
        (["sweep", "smoke", "--num-samples", "x"], ["--num-samples: invalid int value: 'x'", "fer-tune sweep --help"]),
        (["nosuch"], ["invalid choice: 'nosuch'", "(see fer-tune --help)"]),
    ],
)
def test_what_the_argument_parser_refuses_is_one_line_too(argv, words, capsys):
    try:
        code = main(argv)  # an unrecognized argument: fer-tune says it and returns
    except SystemExit as exc:  # argparse's own refusals exit
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("fer-tune: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err


def test_debug_is_taken_after_the_command_too(tmp_path, capsys):
    (tmp_path / "study.json").write_text("{}")
    assert main(["status", str(tmp_path)]) == 2
    with pytest.raises(FerTuneError):
        main(["status", str(tmp_path), "--debug"])
    with pytest.raises(FerTuneError):
        main(["--debug", "status", str(tmp_path)])
