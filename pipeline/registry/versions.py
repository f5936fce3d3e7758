"""MLflow: log a run, register the model bundle, manage the ``champion``/``challenger`` aliases.

Aliases only (registry stages are deprecated in MLflow 3). A new version always gets
``challenger``; it moves to ``champion`` (the alias publish reads) only through the promotion
gate (:mod:`pipeline.evaluation.gate`) or a rollback. The registered model's
``champion_history`` tag lists the champions in order, so "the previous champion" is always
known.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core.config import REPO_ROOT, mlflow_artifact_root, mlflow_tracking_uri
from pipeline.core.logs import stderr_to_log

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


def register_model(
    bundle_dir: Path,
    *,
    run_name: str,
    params: Mapping[str, object],
    metrics: Mapping[str, float],
    tags: Mapping[str, str],
    artifacts: Mapping[str, Path] | None = None,
    recommender=None,
    alias: str | None = CHALLENGER,
    run_id: str | None = None,
) -> Registration:
    """Log params, metrics, lineage tags, readable artifacts and the pyfunc bundle; register
    it as a new version of ``recommender`` with ``alias`` (``challenger``; None for a backfill,
    which is recorded but is no candidate for production).

    Idempotent: a bundle already registered (same fingerprint) is reused, not duplicated.
    ``recommender`` is the bundle already loaded, when the caller has it. ``run_id``: log
    into that run (the night's run, :mod:`pipeline.registry.tracking`), else a new one.
    """
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from pipeline.registry.pyfunc import BUNDLE_ARTIFACT, RecommenderModel  # lazy: mlflow

    configure_mlflow()
    recommender = recommender if recommender is not None else load_bundle(bundle_dir)
    fingerprint = recommender.fingerprint()
    existing = _version_with_fingerprint(fingerprint)
    if existing is not None:
        logger.info(
            "model %s v%s already holds this bundle (%s): reusing it",
            MODEL_NAME,
            existing.version,
            fingerprint[:12],
        )
        if run_id is not None and run_id != existing.run_id:
            MlflowClient().set_tag(run_id, "reused_version", str(existing.version))
        return Registration(existing.run_id, str(existing.version), True)
    example = pd.DataFrame({"user_id": recommender.matrix_.user_ids[:2].astype(str)})
    output = recommender.recommend(example["user_id"], 3)
    signature = infer_signature(example, output, params={"n": 10})
    opened = (
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
        if run_id is not None
        else mlflow.start_run(run_name=run_name)
    )
    with opened as run, stderr_to_log(logger):
        mlflow.log_params(dict(params))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v == v})
        mlflow.set_tags({**tags, "git_commit": git_commit(), FINGERPRINT_TAG: fingerprint})
        for name, path in (artifacts or {}).items():
            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=name)
            elif Path(path).exists():
                mlflow.log_artifact(str(path), artifact_path=name)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=RecommenderModel(),
            artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            code_paths=[str(REPO_ROOT / "pipeline")],
            signature=signature,
            input_example=example,
            pip_requirements=_pip_requirements(bundle_dir),
            registered_model_name=MODEL_NAME,
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.set_model_version_tag(MODEL_NAME, version, FINGERPRINT_TAG, fingerprint)
    client.set_model_version_tag(MODEL_NAME, version, "logical_date", tags.get("logical_date", ""))
    if alias:
        client.set_registered_model_alias(MODEL_NAME, alias, version)
    logger.info(
        "registered %s v%s (run %s)%s",
        MODEL_NAME,
        version,
        run.info.run_id,
        f" as {alias}" if alias else "",
    )
    return Registration(run.info.run_id, version, False)


def load_bundle(bundle_dir: Path):
    """The recommender object saved in ``bundle_dir``, loaded the way the pyfunc loads it."""
    from types import SimpleNamespace

    from pipeline.registry.pyfunc import BUNDLE_ARTIFACT, RecommenderModel  # lazy: mlflow

    model = RecommenderModel()
    model.load_context(SimpleNamespace(artifacts={BUNDLE_ARTIFACT: str(bundle_dir)}))
    return model.recommender


def _version_with_fingerprint(fingerprint: str):
    """The model version already registered for this exact bundle, if any."""
    from mlflow import MlflowClient

    found = MlflowClient().search_model_versions(
        f"name = '{MODEL_NAME}' and tag.{FINGERPRINT_TAG} = '{fingerprint}'"
    )
    return min(found, key=lambda v: int(v.version)) if found else None


def set_champion(version: str, *, decision: str, reason: str) -> None:
    """Move ``champion`` to ``version``; remember the history (for rollback) and why."""
    from mlflow import MlflowClient

    client = MlflowClient()
    history = champion_history()
    client.set_registered_model_alias(MODEL_NAME, CHAMPION, str(version))
    if not history or history[-1] != str(version):
        client.set_registered_model_tag(
            MODEL_NAME, HISTORY_TAG, json.dumps(history + [str(version)])
        )
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
    return {
        "version": str(version),
        "run_id": model_version.run_id,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": {**run.data.tags, **model_version.tags},
    }


def last_registered_at() -> dt.datetime | None:
    """When the newest version of the registered model was created (UTC), or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure_mlflow()
    try:
        found = MlflowClient().search_model_versions(
            f"name = '{MODEL_NAME}'", max_results=1, order_by=["creation_timestamp DESC"]
        )
    except MlflowException:
        return None
    if not found:
        return None
    return dt.datetime.fromtimestamp(found[0].creation_timestamp / 1000, dt.timezone.utc)


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
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _pip_requirements(bundle_dir: Path) -> list[str]:
    """Pins (``name==installed version``, sorted) of what loading the bundle and predicting
    with it imports, plus mlflow: the model's ``requirements.txt``.

    A fresh interpreter of this environment loads ``bundle_dir`` the way the pyfunc does and
    predicts for two known users and an unknown one (the cold-start path); the top-level
    modules it imported are mapped to the installed distributions that provide them, by the
    names pip installs (``xgboost-cpu``, ``scikit-learn``). Left out: the stdlib, the
    project's ``pipeline`` (shipped as code_paths), and a distribution the project's code does
    not import by name that another requirement already requires (joblib for scikit-learn:
    pip brings it, in a version that suits). Optional imports stay (scikit-learn is only an
    extra of xgboost, pyarrow of pandas, yet the bundle needs both). Takes a few seconds.

    Raises ``RuntimeError`` when the bundle does not load and predict in a fresh process: such
    a bundle must not be registered.
    """
    from importlib.metadata import version

    names = {_canonical(name): name for name in _bundle_distributions(Path(bundle_dir))}
    names.setdefault("mlflow", "mlflow")
    pins = [f"{names[key]}=={version(names[key])}" for key in sorted(names)]
    logger.info("model requirements, derived from what the bundle imports: %s", ", ".join(pins))
    return pins


#: Run by :func:`_bundle_imports` in a fresh interpreter: argv = repo root, bundle folder. It
#: loads and predicts as :class:`pipeline.registry.pyfunc.RecommenderModel` does (``load_context``
#: and ``predict`` call these two), minus the wrapper's own ``import mlflow``.
_IMPORT_PROBE = r"""
import ast, json, sys

baseline = {name.partition(".")[0] for name in sys.modules}  # the interpreter's start-up
sys.path.insert(0, sys.argv[1])
import pipeline  # pins the numeric kernels before numpy loads, as every entry point does
from pathlib import Path

import pandas as pd
from pipeline.models.bundle import load_recommender

recommender = load_recommender(Path(sys.argv[2]))
users = [str(u) for u in recommender.matrix_.user_ids[:2]] + ["__unknown_user__"]
if recommender.recommend(pd.Series(users).astype(str), 3).empty:
    sys.exit("the bundle recommended nothing")
loaded = {name.partition(".")[0] for name in sys.modules}
subs = {}
for name in sys.modules:
    top, _, rest = name.partition(".")
    if rest:
        subs.setdefault(top, set()).add(rest.partition(".")[0])
named = set()
for name, module in list(sys.modules.items()):
    if name.partition(".")[0] == "pipeline" and getattr(module, "__file__", None):
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if isinstance(node, ast.Import):
                named.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                named.add(node.module.partition(".")[0])
imported, named = loaded - baseline, named & loaded
print("IMPORTS " + json.dumps({"imported": sorted(imported), "named": sorted(named),
                               "subs": {t: sorted(subs.get(t, ())) for t in imported}}))
"""
_PROBE_TIMEOUT = 300  # seconds; it takes a few
#: Never requirements of their own: the project's code (code_paths) and mlflow, which
#: :func:`_pip_requirements` pins as the ``mlflow`` distribution (not mlflow-skinny/-tracing).
_NOT_REQUIREMENTS = {"pipeline", "mlflow"}


def _bundle_imports(bundle_dir: Path) -> dict:
    """What loading ``bundle_dir`` and predicting imports, seen by a fresh interpreter:
    ``imported`` (top-level modules, beyond the interpreter's start-up), ``named`` (those of
    them the loaded project modules import by name) and ``subs`` (per top-level module, its
    loaded submodules' next name part)."""
    import sys

    command = [sys.executable, "-c", _IMPORT_PROBE, str(REPO_ROOT), str(bundle_dir.resolve())]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, cwd=bundle_dir, timeout=_PROBE_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(
            f"loading the bundle {bundle_dir} in a fresh process took more than {_PROBE_TIMEOUT} s"
        ) from exc
    found = [line for line in done.stdout.splitlines() if line.startswith("IMPORTS ")]
    if done.returncode or not found:
        raise RuntimeError(
            f"the bundle {bundle_dir} did not load and predict in a fresh process "
            f"(exit {done.returncode}): {done.stderr.strip()[-3000:]}"
        )
    return json.loads(found[-1].removeprefix("IMPORTS "))


def _bundle_distributions(bundle_dir: Path) -> set[str]:
    """Installed distributions the bundle needs at serving time (see :func:`_pip_requirements`),
    mlflow aside."""
    import sys
    from importlib.metadata import packages_distributions

    imports = _bundle_imports(bundle_dir)
    owners = packages_distributions()

    def providing(tops: list[str]) -> set[str]:
        found = set()
        for top in tops:
            if top in sys.stdlib_module_names or top in _NOT_REQUIREMENTS or top not in owners:
                continue  # stdlib, project code, or no distribution (e.g. Cython's helpers)
            found |= _owners_of(top, owners[top], imports["subs"].get(top, []))
        return found

    named = providing(imports["named"])
    extra = providing(imports["imported"]) - named
    required = set().union(
        *(_requires_closure(name) - {_canonical(name)} for name in named | extra)
    )
    dropped = sorted(name for name in extra if _canonical(name) in required)
    if dropped:
        logger.debug("imported, but required by another requirement: %s", ", ".join(dropped))
    return named | {name for name in extra if _canonical(name) not in required}


def _owners_of(top: str, candidates: list[str], subs: list[str]) -> set[str]:
    """The distribution(s) behind top-level module ``top``; where several install files under
    it (namespace packages such as ``google``), those owning its loaded submodules ``subs``."""
    from importlib.metadata import distribution

    candidates = set(candidates)
    if len(candidates) == 1:
        return candidates
    wanted = set(subs) or {"__init__"}
    owning = {
        name
        for name in candidates
        if any(
            len(f.parts) > 1 and f.parts[0] == top and f.parts[1].partition(".")[0] in wanted
            for f in distribution(name).files or []
        )
    }
    return owning or candidates


def _requires_closure(name: str) -> set[str]:
    """Canonical names of ``name`` and of everything it requires, transitively (the
    ``Requires-Dist`` that apply here, extras followed where a requirement asks for them)."""
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    seen: set[tuple[str, frozenset]] = set()
    todo = [(name, frozenset())]
    while todo:
        dist, extras = todo.pop()
        if (_canonical(dist), extras) in seen:
            continue
        seen.add((_canonical(dist), extras))
        try:
            specs = requires(dist) or []
        except PackageNotFoundError:
            continue
        for spec in specs:
            req = Requirement(spec)
            if req.marker is None or any(
                req.marker.evaluate({"extra": extra}) for extra in {"", *extras}
            ):
                todo.append((req.name, frozenset(req.extras)))
    return {dist for dist, _ in seen}


def _canonical(name: str) -> str:
    """PEP 503 normalised distribution name (``Scikit_Learn`` -> ``scikit-learn``)."""
    import re

    return re.sub(r"[-_.]+", "-", name).lower()
