"""MLflow tracking (--mlflow URI): the client and Tune callback every stage shares (tracking), a study's trials
(study) and its final stage (final) as MLflow runs."""
