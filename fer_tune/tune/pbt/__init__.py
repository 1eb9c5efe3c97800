"""The population-based-training stage: the driver, the trial (one member), its outputs (population.csv,
lineage.json, the best member evaluated and exported) and the stage read back from files (read)."""


def __getattr__(name: str):  # what an earlier release's pickles name here (fer_tune.tune.moved)
    from ..moved import moved_attribute

    return moved_attribute(__name__, name)
