"""MLflow: log a run, register the model bundle, manage the ``champion``/``challenger`` aliases.

Aliases only (registry stages are deprecated in MLflow 3). A new version always gets
``challenger``; the first version, or one that passes the promotion gate, also becomes
``champion``, which is the alias publish reads.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Registration:
    """Outcome of one registration: small enough for XCom."""

    run_id: str
    version: str
    champion_version: str
    promoted: bool
    reason: str

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
                   gate_passed: bool, gate_reason: str) -> Registration:
    """Log params/metrics/tags and the pyfunc bundle; register it and move the aliases."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from pipeline.pyfunc_model import BUNDLE_ARTIFACT, RecommenderModel
    from pipeline.recommender import AlsRecommender

    configure_mlflow()
    recommender = AlsRecommender.load(bundle_dir)
    fingerprint = recommender.fingerprint()
    existing = _version_with_fingerprint(fingerprint)
    if existing is not None:  # a retry or re-run of the same inputs: no duplicate version
        logger.info("model %s v%s already holds this bundle (%s): reusing it", MODEL_NAME,
                    existing.version, fingerprint[:12])
        return Registration(existing.run_id, str(existing.version),
                            champion_version() or str(existing.version), False,
                            f"unchanged: same bundle as version {existing.version}")
    example = pd.DataFrame({"user_id": recommender.matrix_.user_ids[:2].astype(str)})
    output = recommender.recommend(example["user_id"], 3)
    signature = infer_signature(example, output, params={"n": 10})
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params(dict(params))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v == v})
        mlflow.set_tags({**tags, "git_commit": git_commit(), FINGERPRINT_TAG: fingerprint})
        info = mlflow.pyfunc.log_model(
            name="model", python_model=RecommenderModel(),
            artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            code_paths=[str(REPO_ROOT / "pipeline")], signature=signature,
            input_example=example, pip_requirements=_pip_requirements(),
            registered_model_name=MODEL_NAME)
    version = str(info.registered_model_version)
    from mlflow import MlflowClient

    MlflowClient().set_model_version_tag(MODEL_NAME, version, FINGERPRINT_TAG, fingerprint)
    return _move_aliases(run.info.run_id, version, gate_passed, gate_reason)


def _version_with_fingerprint(fingerprint: str):
    """The model version already registered for this exact bundle, if any."""
    from mlflow import MlflowClient

    found = MlflowClient().search_model_versions(
        f"name = '{MODEL_NAME}' and tag.{FINGERPRINT_TAG} = '{fingerprint}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _move_aliases(run_id: str, version: str, gate_passed: bool, gate_reason: str
                  ) -> Registration:
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_registered_model_alias(MODEL_NAME, CHALLENGER, version)
    current = champion_version()
    if current is None:
        promoted, reason = True, "first version of the model"
    else:
        promoted, reason = gate_passed, gate_reason
    if promoted:
        client.set_registered_model_alias(MODEL_NAME, CHAMPION, version)
    decision = "promoted" if promoted else "kept champion"
    client.set_model_version_tag(MODEL_NAME, version, "promotion", f"{decision}: {reason}")
    logger.info("model %s v%s: %s (%s)", MODEL_NAME, version, decision, reason)
    return Registration(run_id, version, version if promoted else str(current), promoted, reason)


def champion_version() -> str | None:
    """Version behind the ``champion`` alias, or None when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return str(MlflowClient().get_model_version_by_alias(MODEL_NAME, CHAMPION).version)
    except MlflowException:
        return None


def load_champion():
    """The champion as a pyfunc model (raises when missing or broken) and its version."""
    import mlflow.pyfunc

    configure_mlflow()
    version = champion_version()
    if version is None:
        raise LookupError(f"registered model {MODEL_NAME!r} has no {CHAMPION!r} alias")
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@{CHAMPION}")
    return model, version


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

