"""The study layer: everything that runs on Ray Tune or reads Optuna, one package per stage on one skeleton.

runtime (Ray, the trial adapter's core, the stage skeleton, storage, checkpoints, lock, signals, preflight,
internals) · study (spaces, searcher, sweep / resume / extend, reading a study back) · final (the final stage) ·
pbt (population-based training) · mlflow (MLflow tracking). Each stage names its files alike: driver (the
command), trial (its function inside Ray Tune), outputs (what it leaves behind, read back).
"""

from .moved import install

install()  # a stage an earlier release started still resumes
