"""The study: search spaces (spaces, spec), the Optuna searcher and early stopping (searcher), study.json and the
Optuna storage (record, dbretry), the trial inside Ray Tune (trial), the driver of sweep / resume / extend
(driver), reading a study back (outputs), `fer-tune space check` (space_check) and optuna-dashboard (dashboard)."""


def __getattr__(name: str):  # what an earlier release's pickles name here (fer_tune.tune.moved)
    from ..moved import moved_attribute

    return moved_attribute(__name__, name)
