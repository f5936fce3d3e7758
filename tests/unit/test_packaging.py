"""The project's packaging: pyproject.toml's ranges, the two hashed lock files, and the
installed environment agree (a stale lock or virtualenv fails here, not in a DAG run)."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)==([^\s;\\]+)(.*)$")


def _lock(name: str) -> dict[str, tuple[str, list[str]]]:
    """``{canonical name: (version, hashes)}`` of a uv/pip-tools lock file."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in (ROOT / name).read_text().splitlines():
        match = _PIN.match(line)
        if match:
            current = canonicalize_name(match[1])
            assert current not in pins, f"{name}: {current} pinned twice"
            pins[current] = (match[2], [])
        elif current and line.strip().startswith("--hash=sha256:"):
            pins[current][1].append(line.strip().removeprefix("--hash=sha256:").rstrip(" \\"))
        elif line.strip() and not line.startswith((" ", "#")):
            current = None
            raise AssertionError(f"{name}: not a pinned requirement: {line!r}")
    return pins


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_pin_is_exact_and_hashed():
    for name in ("requirements.lock", "requirements-dev.lock"):
        pins = _lock(name)
        assert len(pins) > 100, name
        for package, (_, hashes) in pins.items():
            assert hashes, f"{name}: {package} has no --hash"
            assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), (name, package)


def test_runtime_lock_holds_the_dependencies_and_dev_lock_the_same_runtime_pins():
    runtime, dev = _lock("requirements.lock"), _lock("requirements-dev.lock")
    for spec in _project()["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in runtime, f"{name} is a dependency but not in requirements.lock"
        assert requirement.specifier.contains(runtime[name][0], prereleases=True), (
            f"requirements.lock pins {name}=={runtime[name][0]}, outside {requirement.specifier}"
        )
    for name, (pinned, _) in runtime.items():
        assert dev.get(name, (None,))[0] == pinned, f"{name}: the dev lock pins another version"
    dev_only = set(dev) - set(runtime)
    for spec in _project()["optional-dependencies"]["dev"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in dev_only, f"dev tool {name} missing from requirements-dev.lock or in runtime"
        assert requirement.specifier.contains(dev[name][0], prereleases=True), name
    # the development tools never leak into what a deployment installs
    assert not {"pytest", "ruff", "mypy", "uv"} & set(runtime)


def test_the_virtualenv_matches_the_dev_lock():
    """`make install` installs requirements-dev.lock: a package at another version means the
    lock changed since (run `make install`) or someone installed by hand."""
    different = {}
    for name, (pinned, _) in _lock("requirements-dev.lock").items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            different[name] = (pinned, None)
            continue
        if installed != pinned:
            different[name] = (pinned, installed)
    assert not different, f"locked vs installed: {different}"


def test_the_project_is_installed_as_a_distribution():
    """The package imports through its own installed distribution (`pip install -e .`), not a
    hand-written .pth file."""
    try:
        assert version("recs-pipeline") == _project()["version"]
    except PackageNotFoundError:
        pytest.fail("recs-pipeline is not installed: run `make install`")
    import pipeline

    assert Path(pipeline.__file__).resolve().parent == ROOT / "pipeline"
