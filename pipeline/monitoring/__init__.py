"""Layer 5, watching the pipeline: drift (population stability of features, event mix and
scores against the window the serving champion was trained on), data health, and their export
to Prometheus. It sits beside ``serving`` and ``registry``: it imports only the layers below
(core, lake, features, models, evaluation), never ``serving`` or ``registry``, and never
Airflow (the DAGs call it, not the other way round)."""
