"""The package's shape, read from its source: no import cycles (function-level imports included), no imports of
another module's private names, a Ray- and Optuna-free core, Ray started in one module, modules of a readable
size, and every private Ray / Optuna attribute the code relies on still there in the installed versions."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fer_tune"
CORE = (
    "common",
    "config",
    "data",
    "synthetic",
    "augment",
    "models",
    "optim",
    "regularize",
    "train",
    "evaluate",
    "predict",
    "recipe",
    "formats",
)
MAX_LINES = 420


def modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = ast.parse(f.read_text(), str(f))
    return out


def imports(name: str, tree: ast.Module, is_pkg: bool):
    """(imported module, [names]) of every import statement anywhere in the module, relative ones resolved."""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            yield mod, [a.name for a in node.names]


def graph():
    mods = modules()
    pkgs = {f.parent.relative_to(PKG.parent).as_posix().replace("/", ".") for f in PKG.rglob("__init__.py")}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for name, tree in mods.items():
        for mod, names in imports(name, tree, name in pkgs):
            if not mod.startswith("fer_tune"):
                continue
            for n in names:  # `from fer_tune.x import y` may import the module y
                if f"{mod}.{n}" in mods:
                    edges[name].add(f"{mod}.{n}")
                else:
                    if mod in mods and mod != name:
                        edges[name].add(mod)
                    if n.startswith("_") and n != "__version__":
                        private.append(f"{name} imports {mod}.{n}")
            if not names and mod in mods:
                edges[name].add(mod)
    return mods, edges, private


def test_no_import_cycles_and_no_private_imports():
    mods, edges, private = graph()
    assert not private, private

    # a package's __init__ importing its own submodules is its interface, not a cycle
    def deps(m):
        return {d for d in edges[m] if not (m.count(".") < d.count(".") and d.startswith(m + "."))}

    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(deps(m)):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d) :] + [d]) if d in path else f"{m} -> {d}")
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_core_never_imports_ray_or_optuna_or_the_layers_above():
    mods, edges, _ = graph()
    for name in CORE:
        tree = mods[f"fer_tune.{name}"]
        outside = {mod.split(".")[0] for mod, _ in imports(f"fer_tune.{name}", tree, False)}
        assert not outside & {"ray", "optuna"}, name
        above = [
            d for d in edges[f"fer_tune.{name}"] if d.startswith(("fer_tune.tune", "fer_tune.cli", "fer_tune.report"))
        ]
        assert not above, (name, above)


def test_ray_is_started_and_stopped_in_one_module_and_modules_stay_readable():
    mods, _, _ = graph()
    for name, tree in mods.items():
        calls = {
            f"{n.func.value.id}.{n.func.attr}"
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
        }
        if name != "fer_tune.tune.runtime.session":
            assert not calls & {"ray.init", "ray.shutdown"}, name
    long = {
        n: len(Path(PKG.parent, *n.split(".")).with_suffix(".py").read_text().splitlines())
        for n in mods
        if Path(PKG.parent, *n.split(".")).with_suffix(".py").is_file()
    }
    assert all(v <= MAX_LINES for v in long.values()), {n: v for n, v in long.items() if v > MAX_LINES}


STAGES = ("study", "final", "pbt")  # packages of fer_tune.tune with the same files


def test_the_study_layer_is_packages_by_stage_on_one_runtime():
    """fer_tune/tune/: every stage has its driver (the command), its trial (the function inside Ray Tune) and its
    outputs (what it leaves behind, read back); the runtime imports no stage; a trial imports only the runtime and
    its own stage; only the commands (and the demo's driver calls) import a driver; no module is left beside the
    packages but the map of the old names."""
    _, edges, _ = graph()
    tune = PKG / "tune"
    for stage in STAGES:
        assert {"driver.py", "trial.py", "outputs.py"} <= {f.name for f in (tune / stage).glob("*.py")}, stage
    assert sorted(f.name for f in tune.glob("*.py")) == ["__init__.py", "moved.py"]
    for src, deps in edges.items():
        parts = src.split(".")
        inner = [d for d in deps if d.startswith("fer_tune.tune.") and d.count(".") >= 3]
        if parts[:3] == ["fer_tune", "tune", "runtime"]:
            assert all(d.startswith("fer_tune.tune.runtime.") for d in inner), (src, inner)
        if src.endswith(".trial") and parts[:2] == ["fer_tune", "tune"]:
            own = ".".join(parts[:3]) + "."
            assert all(d.startswith(("fer_tune.tune.runtime.", own)) for d in inner), (src, inner)
        drivers = [d for d in inner if d.endswith(".driver") and not d.startswith(".".join(parts[:3]) + ".")]
        if not src.startswith("fer_tune.cli"):
            assert not drivers or src.endswith(".driver"), (src, drivers)


def test_no_print_in_the_library():
    """Library code logs (named loggers, stderr) and returns results; only the commands print."""
    mods, _, _ = graph()
    for name, tree in mods.items():
        if name.startswith("fer_tune.cli"):
            continue
        prints = [
            n.lineno
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
        ]
        assert not prints, (name, prints)


def test_every_private_ray_and_optuna_attribute_relied_on_is_still_there(tmp_path):
    """Fails loudly when a Ray or Optuna release renames what fer_tune.tune.runtime.internals reads."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from fer_tune.tune.runtime import internals as ri

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = OptunaSearch(
        space=lambda t: t.suggest_float("x", 0, 1) and None,
        metric="m",
        mode="max",
        storage=optuna.storages.InMemoryStorage(),
        study_name="s",
        sampler=optuna.samplers.TPESampler(seed=0),
    )
    missing = [a for a in ri.SEARCH_ATTRS if not hasattr(search, a)]
    assert not missing, f"OptunaSearch lacks {missing}"
    search.suggest("t1")
    trial = ri.search_trials(search)["t1"]
    study = ri.search_study(search)
    assert isinstance(study, optuna.Study) and isinstance(ri.trial_id(trial), int)
    assert isinstance(ri.study_storage(study), optuna.storages.BaseStorage)
    assert ri.study_storage(study).get_trial(ri.trial_id(trial)).number == 0
    ri.search_finished(search, "t1")
    name, sampler = ri.search_name_and_sampler(search)
    assert name == "s" and hasattr(sampler, "reseed_rng")
    asha = ASHAScheduler(metric="m", mode="max", max_t=8, grace_period=1, reduction_factor=2, time_attr="epoch")
    assert all(hasattr(asha, a) for a in ri.ASHA_ATTRS)
    rungs = ri.bracket_rungs(ri.asha_brackets(asha)[0])
    assert [m for m, _ in rungs] == [8, 4, 2, 1] and all(isinstance(r, dict) for _, r in rungs)
    assert ri.asha_reading(asha) == ("m", "epoch", 1.0)
    grid = optuna.samplers.GridSampler({"a": [1, 2], "b": ["x", "y"]}, seed=0)
    assert all(hasattr(grid, a) for a in ri.GRID_ATTRS)
    gstudy = optuna.create_study(sampler=grid)
    gstudy.optimize(lambda t: t.suggest_int("a", 1, 2) + len(t.suggest_categorical("b", ["x", "y"])), n_trials=2)
    for t in gstudy.trials:  # as the sampler itself recorded them
        assert ri.grid_point(grid, t.params) == {k: t.system_attrs[k] for k in ("grid_id", "search_space")}
    assert ri.ray_console_popen() is not None, "ray._private.services.ConsolePopen is gone"
    import inspect

    manager = ri.snapshot_manager()  # Tune's snapshots of its state: timed by it, its period set in "auto" mode
    assert callable(getattr(manager, ri.SNAPSHOT_UPDATE))
    sync = list(inspect.signature(getattr(manager, ri.SNAPSHOT_SYNC)).parameters)
    assert sync == ["self", "save_fn", "force", "wait"], sync
    snap = manager(storage=None, checkpoint_period="auto")
    assert all(hasattr(snap, a) for a in ri.SNAPSHOT_ATTRS) and getattr(snap, ri.SNAPSHOT_ATTRS[0]) is True
    module, name = ri.storage_upload()
    params = list(inspect.signature(getattr(module, name)).parameters)
    assert params == ["local_path", "fs", "fs_path", "exclude"], f"{module.__name__}.{name} takes {params}"
    from ray import tune

    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(name="t", storage_path=str(tmp_path), verbose=3))
    assert all(hasattr(tuner, a) for a in ri.TUNER_ATTRS) and ri.tuner_run_config(tuner).verbose == 3
    assert all(hasattr(tuner._local_tuner, a) for a in ri.TUNER_INTERNAL_ATTRS)
    assert ri.tuner_tune_config(tuner).num_samples == 1
    from ray.tune.schedulers import PopulationBasedTraining

    pbt = PopulationBasedTraining(time_attr="epoch", metric="m", mode="max", hyperparam_mutations={"a": [1, 2]})
    assert all(hasattr(pbt, a) for a in ri.PBT_ATTRS) and getattr(pbt, ri.PBT_ATTRS[0]) == {}
    made = inspect.getsource(inspect.getmodule(PopulationBasedTraining)._PBTTrialState.__init__)
    assert all(f"self.{a}:" in made for a in ri.PBT_STATE_ATTRS), ri.PBT_STATE_ATTRS
    assert list(inspect.signature(pbt.choose_trial_to_run).parameters) == ["tune_controller"]
    from ray.tune.search import SearchGenerator

    controller = ri.tune_controller()  # a resume re-roots the experiment its search algorithm makes trials from
    assert list(inspect.signature(controller.resume).parameters)[:2] == ["self", "resume_config"]
    made = inspect.getsource(controller.__init__)
    assert all(f"self.{a} =" in made for a in ri.CONTROLLER_ATTRS), ri.CONTROLLER_ATTRS
    assert f"self.{ri.GENERATOR_EXPERIMENT} =" in inspect.getsource(SearchGenerator.set_state)
    from ray.tune.experiment import config_parser

    assert 'storage=spec.get("storage")' in inspect.getsource(config_parser._create_trial_from_spec)  # new trials


@pytest.mark.parametrize("name", ["ray", "optuna"])
def test_the_tested_minor_versions_are_the_ones_installed(name):
    """pyproject.toml bounds ray and optuna to the minor releases these tests ran with."""
    import importlib
    import re

    text = (PKG.parent / "pyproject.toml").read_text()
    low, high = re.search(rf'"{name}(?:\[tune\])?>=([\d.]+),<([\d.]+)"', text).groups()
    version = tuple(int(x) for x in importlib.import_module(name).__version__.split(".")[:2])
    assert tuple(int(x) for x in low.split(".")[:2]) <= version < tuple(int(x) for x in high.split(".")[:2])


LAYOUT_NAMES = {
    "result.json",
    "tuner.pkl",
    "experiment_state-",
    "searcher-state-",
    "checkpoint_",
}  # fer_tune.tune.runtime.layout's


def test_tunes_file_names_are_read_in_one_module():
    """Tune's on-disk layout is named in fer_tune.tune.runtime.layout only (checked against Tune below)."""
    mods, _, _ = graph()
    for name, tree in mods.items():
        if name == "fer_tune.tune.runtime.layout":
            continue
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not strings & LAYOUT_NAMES, (name, strings & LAYOUT_NAMES)


@pytest.mark.slow
def test_tunes_on_disk_layout_relied_on_is_still_there(tmp_path):
    """Fails loudly when a Ray release moves or renames what fer_tune.tune.runtime.layout reads: a real Tune run of
    two trials, two reports each with a checkpoint, read back through the layout module."""
    from conftest import session_ray

    session_ray()
    import tempfile

    from ray import tune

    from fer_tune.tune.runtime import layout

    def trainable(config):
        for epoch in (1, 2):
            with tempfile.TemporaryDirectory() as d:
                Path(d, "weights").write_text(str(epoch))
                result = {"epoch": epoch, "trial_id": tune.get_context().get_trial_id()}
                tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))

    run_config = tune.RunConfig(name="t", storage_path=str(tmp_path), verbose=0)
    tune.Tuner(trainable, param_space={"a": tune.grid_search([1, 2])}, run_config=run_config).fit()
    exp = tmp_path / "t"
    assert layout.has_tune_state(exp) and (exp / layout.TUNER_FILE).stat().st_size > 0
    states = layout.experiment_trial_states(exp)
    assert len(states) == 2 and set(states.values()) == {"TERMINATED"}, states
    made = layout.experiment_trials(exp)  # in the order Tune made them, as a repair of the study numbers them
    assert [t["config"] for t in made] == [{"a": 1}, {"a": 2}], made
    assert all((exp / t["logdir"]).is_dir() and t["start_time"] for t in made), made
    trials = [d for d in exp.iterdir() if d.is_dir()]
    rows = {d: list(layout.trial_results(d)) for d in trials}
    assert sorted(r[-1]["trial_id"] for r in rows.values()) == sorted(states)
    assert all([r["epoch"] for r in rs] == [1, 2] for rs in rows.values())
    for d in trials:
        kept = sorted(c for c in d.iterdir() if c.name.startswith(layout.CHECKPOINT_PREFIX))
        assert [(c / "weights").read_text() for c in kept] == ["1", "2"], d
