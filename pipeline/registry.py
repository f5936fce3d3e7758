"""MLflow: log a run, register the model bundle, manage the ``champion``/``challenger`` aliases.

Aliases only (registry stages are deprecated in MLflow 3). A new version always gets
``challenger``; it moves to ``champion`` (the alias publish reads) only through the promotion
gate (:mod:`pipeline.gate`) or a rollback. The registered model's ``champion_history`` tag
lists the champions in order, so "the previous champion" is always known.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.config import REPO_ROOT, mlflow_artifact_root, mlflow_tracking_uri

logger = logging.getLogger(__name__)

MODEL_NAME = "recommender"
EXPERIMENT = "recommendations"
CHAMPION, CHALLENGER = "champion", "challenger"
FINGERPRINT_TAG = "bundle_sha256"
HISTORY_TAG = "champion_history"


@dataclass(frozen=True)
class Registration:
    """A logged and registered model version: small enough for XCom."""

    run_id: str
    version: str
    reused: bool  # True when this exact bundle was already registered (a retry or re-run)

    def to_dict(self) -> dict:
        return asdict(self)


def configure_mlflow() -> None:
    """Point MLflow at the project's tracking store and experiment (created if needed)."""
    import mlflow

    mlflow.set_tracking_uri(mlflow_tracking_uri())
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=mlflow_artifact_root())
    mlflow.set_experiment(EXPERIMENT)


def register_model(bundle_dir: Path, *, run_name: str, params: Mapping[str, object],
                   metrics: Mapping[str, float], tags: Mapping[str, str],
                   artifacts: Mapping[str, Path] | None = None,
                   recommender=None) -> Registration:
    """Log params, metrics, lineage tags, readable artifacts and the pyfunc bundle; register
    it as a new version of ``recommender`` with alias ``challenger``.

    Idempotent: a bundle already registered (same fingerprint) is reused, not duplicated.
    ``recommender`` is the bundle already loaded, when the caller has it.
    """
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from pipeline.pyfunc_model import BUNDLE_ARTIFACT, RecommenderModel

    configure_mlflow()
    recommender = recommender if recommender is not None else load_bundle(bundle_dir)
    fingerprint = recommender.fingerprint()
    existing = _version_with_fingerprint(fingerprint)
    if existing is not None:
        logger.info("model %s v%s already holds this bundle (%s): reusing it", MODEL_NAME,
                    existing.version, fingerprint[:12])
        return Registration(existing.run_id, str(existing.version), True)
    example = pd.DataFrame({"user_id": recommender.matrix_.user_ids[:2].astype(str)})
    output = recommender.recommend(example["user_id"], 3)
    signature = infer_signature(example, output, params={"n": 10})
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(dict(params))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v == v})
        mlflow.set_tags({**tags, "git_commit": git_commit(), FINGERPRINT_TAG: fingerprint})
        for name, path in (artifacts or {}).items():
            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=name)
            elif Path(path).exists():
                mlflow.log_artifact(str(path), artifact_path=name)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=RecommenderModel(),
            artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            code_paths=[str(REPO_ROOT / "pipeline")], signature=signature,
            input_example=example, pip_requirements=_pip_requirements(),
            registered_model_name=MODEL_NAME)
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.set_model_version_tag(MODEL_NAME, version, FINGERPRINT_TAG, fingerprint)
    client.set_model_version_tag(MODEL_NAME, version, "logical_date", tags.get("logical_date", ""))
    client.set_registered_model_alias(MODEL_NAME, CHALLENGER, version)
    logger.info("registered %s v%s (run %s) as %s", MODEL_NAME, version, run.info.run_id,
                CHALLENGER)
    return Registration(run.info.run_id, version, False)


def load_bundle(bundle_dir: Path):
    """The recommender object saved in ``bundle_dir``, loaded the way the pyfunc loads it."""
    from types import SimpleNamespace

    from pipeline.pyfunc_model import BUNDLE_ARTIFACT, RecommenderModel

    model = RecommenderModel()
    model.load_context(SimpleNamespace(artifacts={BUNDLE_ARTIFACT: str(bundle_dir)}))
    return model.recommender


def _version_with_fingerprint(fingerprint: str):
    """The model version already registered for this exact bundle, if any."""
    from mlflow import MlflowClient

    found = MlflowClient().search_model_versions(
        f"name = '{MODEL_NAME}' and tag.{FINGERPRINT_TAG} = '{fingerprint}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def set_champion(version: str, *, decision: str, reason: str) -> None:
    """Move ``champion`` to ``version``; remember the history (for rollback) and why."""
    from mlflow import MlflowClient

    client = MlflowClient()
    history = champion_history()
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, str(version))
    if not history or history[-1] != str(version):
        client.set_registered_model_tag(MODEL_NAME, HISTORY_TAG,
                                        json.dumps(history + [str(version)]))
    tag_decision(version, decision=decision, reason=reason)
    logger.info("champion of %s is now v%s (%s: %s)", MODEL_NAME, version, decision, reason)


def tag_decision(version: str, *, decision: str, reason: str) -> None:
    """Record a gate decision on the model version (and so in the MLflow UI)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_model_version_tag(MODEL_NAME, str(version), "promotion_decision", decision)
    client.set_model_version_tag(MODEL_NAME, str(version), "promotion_reason", reason[:5000])


def champion_history() -> list[str]:
    """Versions that have been champion, oldest first (consecutive duplicates removed)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        model = MlflowClient().get_registered_model(MODEL_NAME)
    except MlflowException:
        return []
    return [str(v) for v in json.loads(model.tags.get(HISTORY_TAG, "[]"))]


def previous_champion() -> str | None:
    """The champion before the current one: the default rollback target."""
    current = champion_version()
    earlier = [v for v in champion_history() if v != current]
    return earlier[-1] if earlier else None


def version_details(version: str) -> dict:
    """Params and tags of the run that produced ``version`` (top_n, logical_date, ...)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    model_version = client.get_model_version(MODEL_NAME, str(version))
    run = client.get_run(model_version.run_id)
    return {"version": str(version), "run_id": model_version.run_id,
            "params": dict(run.data.params), "metrics": dict(run.data.metrics),
            "tags": {**run.data.tags, **model_version.tags}}


def champion_version() -> str | None:
    """Version behind the ``champion`` alias, or None when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(MODEL_NAME, CHAMPION).version)
    except MlflowException:
        return None


def load_version(version: str | None = None):
    """(pyfunc model, version) for ``version``, or for the champion when None.

    Raises ``LookupError`` when there is no champion, and MLflow's error when the artifact
    is missing or broken: publish must fail loudly, never serve something else.
    """
    import mlflow.pyfunc

    configure_mlflow()
    if version is None:
        version = champion_version()
        if version is None:
            raise LookupError(f"registered model {MODEL_NAME!r} has no {CHAMPION!r} alias")
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{version}")
    return model, str(version)


def load_champion():
    """(pyfunc model, version) of the current champion; see :func:`load_version`."""
    return load_version(None)


def git_commit() -> str:
    """The repo's HEAD commit (lineage), or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _pip_requirements() -> list[str]:
    """Pins for the model's runtime, read from requirements.txt (no slow inference)."""
    wanted = {"mlflow", "implicit", "pandas", "numpy", "scipy", "pyarrow"}
    pins = []
    path = REPO_ROOT / "requirements.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        name = line.split("==")[0].strip().lower()
        if name in wanted:
            pins.append(line.strip())
    return pins or sorted(wanted)

