"""One MLflow run per night: the model stages log into it, each as a nested run.

A night's ``tune``, ``train``, ``evaluate`` and ``register`` run as separate Airflow tasks,
``train`` and ``evaluate`` side by side, in separate processes. They share one MLflow run, the
*night's run* (``nightly-<date>`` in the experiment ``recommendations``), whose id ``tune``
creates and writes to ``<run dir>/mlflow_run.json``; later stages read it (and create it
when a stage runs on its own, as tests and a manual re-run of one stage do, under a file
lock so that two tasks never create two). Each stage opens a nested run under it (the UI
shows them as its children) with MLflow's system metrics on: CPU, memory, disk and network
while the stage works. The night's run holds what describes the model: the input datasets
(``mlflow.data``, with a digest), the tuning table and folds, the params and metrics, the
registered model, the reports and a trend plot. ``register`` marks it finished; a stage that
fails marks it failed, and its retry sets it running again.

A new ``tune`` (a cleared and re-run night) starts a new night's run: params cannot change
inside an MLflow run, and a re-run may use other Params.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pandas as pd

from pipeline.lake.storage import durable_write
from pipeline.registry.versions import (
    EXPERIMENT,
    MODEL_NAME,
    champion_history,
    configure_mlflow,
)

logger = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
#: Seconds between system-metric samples of a stage (MLflow's default is 10); MLflow's
#: ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it.
SYSTEM_METRICS_INTERVAL_S = 5.0


def night_run_id(run_dir: Path, cutoff: dt.datetime, *, new: bool = False) -> str:
    """The night's MLflow run id: the one recorded in ``run_dir``, else (or with ``new``) a
    new run, recorded there."""
    from mlflow import MlflowClient

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RUN_FILE
    with open(run_dir / f".{RUN_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists() and not new:
            return json.loads(path.read_text())["run_id"]
        configure_mlflow()
        client = MlflowClient()
        experiment = client.get_experiment_by_name(EXPERIMENT)
        run = client.create_run(
            experiment.experiment_id,
            run_name=f"nightly-{cutoff:%Y-%m-%d}",
            tags={"logical_date": cutoff.isoformat()},
        )
        payload = json.dumps({"run_id": run.info.run_id, "logical_date": cutoff.isoformat()})
        durable_write(path, lambda fh: fh.write(payload.encode()))
        logger.info("MLflow: the night's run for %s is %s", f"{cutoff:%Y-%m-%d}", run.info.run_id)
        return run.info.run_id


@contextlib.contextmanager
def stage_run(
    run_dir: Path, cutoff: dt.datetime, stage: str, *, new_night: bool = False
) -> Iterator[str]:
    """A nested MLflow run for ``stage`` under the night's run, with system metrics on;
    yields the night's run id (log what describes the model there, e.g. with
    :func:`log_dataset`). A stage that raises marks both runs failed."""
    import mlflow
    from mlflow import MlflowClient

    night = night_run_id(run_dir, cutoff, new=new_night)
    client = MlflowClient()
    client.update_run(night, status="RUNNING")  # a nested run needs an active parent
    mlflow.set_system_metrics_sampling_interval(
        float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", SYSTEM_METRICS_INTERVAL_S))
    )
    try:
        with mlflow.start_run(
            run_name=stage,
            parent_run_id=night,
            log_system_metrics=True,
            tags={"stage": stage, "logical_date": cutoff.isoformat()},
        ):
            yield night
    except BaseException:
        client.set_terminated(night, status="FAILED")
        raise


def finish_night(night: str) -> None:
    """Mark the night's run finished (``register`` is its last model stage)."""
    from mlflow import MlflowClient

    MlflowClient().set_terminated(night, status="FINISHED")


def file_digest(path: Path, length: int = 16) -> str:
    """sha256 of a file's bytes (the first ``length`` hex digits): the dataset's digest.

    MLflow's own pandas digest maps ``type`` over every cell of the frame, which takes
    minutes on a night's tens of millions of events; the file is what the stage read."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:length]


def log_dataset(
    night: str,
    path: Path,
    *,
    name: str,
    context: str,
    sample: pd.DataFrame,
    tags: Mapping[str, object] | None = None,
) -> str:
    """Log ``path`` (a Parquet file a stage read) as an input dataset of the night's run:
    its name, source, digest (:func:`file_digest`) and schema (inferred from ``sample``, a
    few rows); ``tags`` (row counts, time window) go on the input. Returns the digest."""
    from mlflow import MlflowClient
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types.utils import _infer_schema

    digest = file_digest(path)
    frame = sample.head(100).copy()
    for column in frame.columns:  # the schema types MLflow knows
        if isinstance(frame[column].dtype, pd.CategoricalDtype):
            frame[column] = frame[column].astype(str)
    dataset = MetaDataset(
        resolve_dataset_source(str(path)), name=name, digest=digest, schema=_infer_schema(frame)
    )
    input_tags = [
        InputTag("mlflow.data.context", context),
        *(InputTag(str(key), str(value)) for key, value in (tags or {}).items()),
    ]
    MlflowClient().log_inputs(
        night, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=input_tags)]
    )
    logger.info("MLflow: dataset %s (%s) digest %s", name, context, digest)
    return digest


def champion_metrics(keys: Mapping[str, str], last: int = 20) -> pd.DataFrame:
    """The holdout metrics of the last ``last`` champions, oldest first: ``logical_date``,
    ``version`` and one column per ``keys`` item (column name -> MLflow metric key)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    rows = []
    for version in champion_history()[-last:]:
        try:
            run = client.get_run(client.get_model_version(MODEL_NAME, version).run_id)
        except MlflowException:
            continue
        date = run.data.tags.get("logical_date")
        if not date:
            continue
        rows.append(
            {
                "logical_date": pd.Timestamp(date),
                "version": version,
                **{name: run.data.metrics.get(key) for name, key in keys.items()},
            }
        )
    return pd.DataFrame(rows, columns=["logical_date", "version", *keys])
