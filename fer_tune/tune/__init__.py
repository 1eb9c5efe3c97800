"""The study layer: everything that runs on Ray Tune or reads Optuna (studies, the final stage, cluster checks).

runtime (Ray start/stop, the trial adapter), record (study.json, fingerprint, Optuna storage), spaces (search
spaces), searcher (the Optuna searcher, resumable ASHA, Tune callbacks), study (sweep / resume / extend), final
(the final stage's driver), trials (reading a study back), checkpoints, storage (local paths and URIs), lock,
signals, preflight, internals (the private Ray / Optuna attributes relied on).
"""
