"""Where the modules of the flat study layer of fer-tune 0.x went when it became packages (runtime, study, final,
pbt, mlflow). A study, final or PBT stage that an earlier release started pickled Tune's state with those names
(tuner.pkl: the searcher, the scheduler, the callbacks); `install()` lets them resolve, so that such a stage still
resumes. Nothing new is ever written under the old names."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Any

_T = "fer_tune.tune."
MODULES = {  # the old module -> the module that holds its names now
    _T + old: _T + new
    for old, new in {
        "checkpoints": "runtime.checkpoints",
        "internals": "runtime.internals",
        "lock": "runtime.lock",
        "signals": "runtime.signals",
        "storage": "runtime.storage",
        "stages": "runtime.stage",
        "preflight": "runtime.preflight",
        "progress": "runtime.progress",
        "runtime": "runtime.session",
        "dashboard": "study.dashboard",
        "dbretry": "study.dbretry",
        "record": "study.record",
        "searcher": "study.searcher",
        "space_check": "study.space_check",
        "spaces": "study.spaces",
        "spec": "study.spec",
        "study": "study.driver",
        "trials": "study.outputs",
        "final": "final.driver",
        "final_outputs": "final.outputs",
        "final_trial": "final.trial",
        "pbt": "pbt.driver",
        "pbt_outputs": "pbt.outputs",
        "pbt_read": "pbt.read",
        "pbt_trial": "pbt.trial",
        "tracking": "mlflow.tracking",
        "tracking_final": "mlflow.final",
        "tracking_study": "mlflow.study",
    }.items()
}
NAMES = {  # names that left their old module for another one than MODULES says
    (_T + old, name): _T + new
    for (old, name), new in {
        ("runtime", "memory_mb"): "runtime.trial",
        ("runtime", "study_trial"): "study.trial",
        ("runtime", "CRASH_ENV"): "study.trial",
        ("record", "versions"): "runtime.session",
        ("record", "torch_version"): "runtime.session",
        ("progress", "study_progress"): "study.outputs",
        ("progress", "_TrialNumbers"): "study.outputs",
        ("progress", "final_progress"): "final.outputs",
        ("progress", "_seed_name"): "final.outputs",
        ("progress", "_seed_ended"): "final.outputs",
    }.items()
}


def moved_attribute(old: str, name: str) -> Any:
    """`old.name` as an earlier release named it; AttributeError when it never existed."""
    new = NAMES.get((old, name)) or MODULES.get(old)
    if new is not None and not name.startswith("__"):
        module = importlib.import_module(new)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {old!r} has no attribute {name!r}")


class _OldModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name (one that is not a package now) as a module whose names resolve to the new ones."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MODULES or fullname.rpartition(".")[2] in ("runtime", "study", "final", "pbt"):
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__getattr__ = lambda name: moved_attribute(spec.name, name)  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    if not any(isinstance(f, _OldModules) for f in sys.meta_path):
        sys.meta_path.append(_OldModules())
