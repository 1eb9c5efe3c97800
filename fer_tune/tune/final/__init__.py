"""The final stage: the driver (final.json, the seeds' Ray experiment), the trial (one seed of
fer_tune.recipe.run_seed inside Ray Tune) and its outputs (metrics, history, progress lines)."""


def __getattr__(name: str):  # what an earlier release's pickles name here (fer_tune.tune.moved)
    from ..moved import moved_attribute

    return moved_attribute(__name__, name)
