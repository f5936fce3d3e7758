"""The registered model's requirements: derived from what the bundle imports, and enough to
load and serve it where nothing else is installed.

A fresh virtualenv per run is too slow for the suite, so "nothing else is installed" is
emulated: a fresh interpreter whose import system treats every third-party distribution that
is neither a requirement nor in the transitive ``Requires-Dist`` closure of the requirements
as not installed.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from pipeline.lake.demo.synthetic import generate_clickstream
from pipeline.models.twostage import TwoStageRecommender
from pipeline.registry import versions as registry

REPO = Path(__file__).resolve().parents[3]
CUTOFF = dt.datetime(2024, 2, 1, tzinfo=dt.timezone.utc)
PARAMS = dict(
    factors=8,
    iterations=3,
    label_days=7,
    label_windows=2,
    n_estimators=30,
    n_als=20,
    n_knn=20,
    n_popular=10,
    cold_segment="age_band",
    random_state=3,
)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _providers(module: str) -> set[str]:
    """Canonical names of the installed distributions providing top-level ``module``."""
    return {_canonical(name) for name in packages_distributions().get(module, [])}


def _closure(requirements: list[str]) -> set[str]:
    """Canonical names of ``requirements`` and everything they require, transitively: what
    ``pip install -r`` of them would bring (extras followed where asked for)."""
    seen: set[tuple[str, frozenset]] = set()
    todo = [(req.name, frozenset(req.extras)) for req in map(Requirement, requirements)]
    while todo:
        name, extras = todo.pop()
        if (_canonical(name), extras) in seen:
            continue
        seen.add((_canonical(name), extras))
        try:
            specs = requires(name) or []
        except PackageNotFoundError:
            continue
        for req in map(Requirement, specs):
            if req.marker is None or any(
                req.marker.evaluate({"extra": extra}) for extra in {"", *extras}
            ):
                todo.append((req.name, frozenset(req.extras)))
    return {name for name, _ in seen}


# argv: model folder, JSON list of the allowed (canonical) distribution names. Every
# third-party module outside those distributions is "not installed": the path finder does not
# find it, so `import` raises ModuleNotFoundError and importlib.util.find_spec gives None,
# as in an environment built from the model's requirements alone. The stdlib and the
# project's own `pipeline` (shipped in the model as code_paths) are allowed.
_SERVE_WITH_ONLY = r"""
import functools, importlib.machinery, importlib.metadata, importlib.util, json, re, sys

allowed = set(json.loads(sys.argv[2]))
owners = importlib.metadata.packages_distributions()
refused = set()


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def not_installed(top, sub):
    if top in sys.stdlib_module_names or top == "pipeline" or top not in owners:
        return False
    dists = set(owners[top])
    if len(dists) > 1 and sub:  # a namespace package (google.*): the sub-package's owner
        dists = {d for d in dists if any(
            len(f.parts) > 1 and f.parts[0] == top and f.parts[1].partition(".")[0] == sub
            for f in importlib.metadata.distribution(d).files or [])} or dists
    return not {canonical(d) for d in dists} & allowed


class OnlyRequirements(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        top, _, rest = name.partition(".")
        if not_installed(top, rest.partition(".")[0]):
            refused.add(name)
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [OnlyRequirements if finder is importlib.machinery.PathFinder else finder
                    for finder in sys.meta_path]
guard_works = importlib.util.find_spec("airflow") is None  # installed here, not a requirement

import mlflow.pyfunc
import pandas as pd

model = mlflow.pyfunc.load_model(sys.argv[1])
lists = model.predict(pd.DataFrame({"user_id": sys.argv[3:]}), params={"n": 3})
print("SERVED " + json.dumps({"rows": len(lists), "users": int(lists["user_id"].nunique()),
                              "guard_works": guard_works, "refused": sorted(refused)}))
"""


def _serve_with_only(
    model_dir: Path, requirements: list[str], users: list[str], cwd: Path
) -> subprocess.CompletedProcess:
    allowed = sorted(_closure(requirements))
    return subprocess.run(
        [sys.executable, "-c", _SERVE_WITH_ONLY, str(model_dir), json.dumps(allowed), *users],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def _served(done: subprocess.CompletedProcess) -> dict:
    lines = [line for line in done.stdout.splitlines() if line.startswith("SERVED ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1].removeprefix("SERVED "))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A small fitted two-stage bundle (ALS + kNN candidates, XGBoost ranker), saved."""
    data = generate_clickstream(n_users=120, n_items=60, n_days=40, start="2024-01-01", seed=3)
    model = TwoStageRecommender(**PARAMS).fit(
        data.events, CUTOFF, items=data.items, users=data.users
    )
    assert model.ranker_ is not None
    return model.save(tmp_path_factory.mktemp("bundle") / "model")


@pytest.fixture(scope="module")
def requirements(bundle) -> list[str]:
    return registry._pip_requirements(bundle)


def test_requirements_pin_what_the_bundle_imports(requirements):
    names = [_canonical(Requirement(line).name) for line in requirements]
    assert names == sorted(set(names)), "sorted, one pin per distribution"
    for line in requirements:
        req = Requirement(line)
        assert str(req.specifier) == f"=={version(req.name)}", line  # the installed version
    # by the names pip installs (xgboost-cpu here, scikit-learn), not the import names
    for module in ("xgboost", "sklearn", "implicit", "numpy", "pandas", "scipy", "pyarrow"):
        assert _providers(module) and _providers(module) <= set(names), module
    assert "mlflow" in names and "sklearn" not in names
    assert not {"pipeline", "mlflow-skinny", "mlflow-tracing"} & set(names)
    assert not set(names) & {_canonical(m) for m in sys.stdlib_module_names}
    # joblib is imported (by scikit-learn), but scikit-learn requires it: pip brings it
    assert "joblib" not in names and "joblib" in _closure(requirements)


def test_requirements_are_deterministic(bundle, requirements):
    assert registry._pip_requirements(bundle) == requirements


def test_a_bundle_that_does_not_load_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(RuntimeError, match="did not load and predict in a fresh process"):
        registry._pip_requirements(tmp_path)


def test_requires_closure_follows_requires_dist():
    closure = registry._requires_closure("scikit-learn")
    assert {"scikit-learn", "numpy", "scipy", "joblib", "threadpoolctl"} <= closure
    assert closure == _closure(["scikit-learn"])


def test_owners_of_a_namespace_package_come_from_its_submodules():
    owners = packages_distributions().get("google", [])
    if "protobuf" not in owners or len(set(owners)) < 2:
        pytest.skip("needs protobuf and another distribution under the google namespace")
    assert registry._owners_of("google", owners, ["protobuf"]) == {"protobuf"}


def test_registered_model_serves_with_only_its_requirements(bundle, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_ARTIFACT_ROOT", (tmp_path / "mlartifacts").as_uri())
    registration = registry.register_model(
        bundle, run_name="requirements", params={}, metrics={}, tags={}
    )
    uri = f"models:/{registry.MODEL_NAME}/{registration.version}"
    lines = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().splitlines()
    requirements = [
        line.strip() for line in lines if line.strip() and not line.startswith(("#", "-"))
    ]
    model_dir = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    users = [*registry.load_bundle(bundle).matrix_.user_ids[:3].astype(str), "__nobody__"]
    run = tmp_path / "serve"
    run.mkdir()

    served = _served(_serve_with_only(model_dir, requirements, users, run))
    assert served["guard_works"], "the import guard let a non-requirement through"
    assert served["rows"] == 3 * len(users) and served["users"] == len(users)
    logged = {_canonical(Requirement(line).name) for line in requirements}
    assert _providers("xgboost") | _providers("sklearn") <= logged, requirements

    # The check has teeth: without the distribution behind `xgboost`, loading fails.
    without = [
        line
        for line in requirements
        if _canonical(Requirement(line).name) not in _providers("xgboost")
    ]
    assert not _providers("xgboost") & _closure(without) and len(without) < len(requirements)
    done = _serve_with_only(model_dir, without, users, run)
    assert done.returncode != 0 and "No module named 'xgboost'" in done.stderr, done.stderr[-2000:]


def test_versions_registered_before_the_layered_layout_find_their_pyfunc_class():
    """MLflow unpickles the wrapper by module path: ``pipeline.pyfunc_model`` must stay."""
    from pipeline.pyfunc_model import RecommenderModel as legacy
    from pipeline.registry.pyfunc import RecommenderModel

    assert legacy is RecommenderModel
