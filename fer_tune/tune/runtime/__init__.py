"""What every stage runs on: Ray's lifecycle (session, the only module that starts or stops Ray), the trial
adapter's shared core (trial), the stage skeleton the study, final and PBT drivers share (stage), progress lines,
Ray storage and Tune's on-disk layout (storage, checkpoints), one driver per directory (lock), SIGTERM / SIGHUP
(signals), the checks of a cluster before a run (preflight) and every private Ray / Optuna attribute relied on
(internals). Nothing here knows a stage."""


def __getattr__(name: str):  # what an earlier release's pickles name here (fer_tune.tune.moved)
    from ..moved import moved_attribute

    return moved_attribute(__name__, name)
