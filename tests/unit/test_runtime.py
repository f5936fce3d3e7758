"""The BLAS pin that keeps lists identical across machines (pipeline.runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import runtime

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True, check=True, timeout=120)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx avx2 fma\n"
                       "processor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert runtime.cpu_flags(cpuinfo) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert runtime.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(("machine", "flags", "expected"), [
    ("x86_64", {"sse2", "avx", "avx2"}, "Haswell"),
    ("AMD64", {"avx2", "avx512f"}, "Haswell"),     # AVX-512 machines run the AVX2 kernels too
    ("x86_64", {"sse2", "avx"}, None),             # Haswell kernels would be illegal here
    ("aarch64", {"asimd"}, None),
])
def test_pinned_core_only_where_the_kernels_run(machine, flags, expected):
    assert runtime.pinned_core(machine, frozenset(flags)) == expected


def test_pin_blas_keeps_what_the_environment_already_says():
    env = {"OPENBLAS_CORETYPE": "Sandybridge"}
    runtime.pin_blas(env, core="Haswell")
    assert env == {"OPENBLAS_CORETYPE": "Sandybridge", "OPENBLAS_NUM_THREADS": "1"}
    env = {}
    runtime.pin_blas(env, core=None if runtime.pinned_core() is None else "Haswell")
    assert env.get("OPENBLAS_NUM_THREADS") == "1"


def test_importing_pipeline_first_pins_the_loaded_kernels():
    out = _python("import json, os, pipeline, numpy\n"
                  "from pipeline.runtime import blas_cores\n"
                  "print(json.dumps([os.environ.get('OPENBLAS_CORETYPE'), blas_cores()]))")
    wanted, cores = json.loads(out.stdout)
    assert cores and all(c.startswith("openblas ") for c in cores)
    if runtime.pinned_core() is None:
        assert wanted is None
    else:
        assert wanted == runtime.PINNED_CORE
        assert cores == [f"openblas {runtime.PINNED_CORE}"]


def test_check_blas_warns_when_numpy_was_loaded_with_other_kernels():
    if runtime.pinned_core() is None:
        pytest.skip("needs an x86-64 CPU with AVX2 (to load the Sandybridge kernels)")
    out = _python("import logging, os, numpy, scipy.linalg\n"
                  "logging.basicConfig(level=logging.WARNING)\n"
                  "os.environ['OPENBLAS_CORETYPE'] = 'Haswell'\n"
                  "from pipeline.runtime import check_blas\n"
                  "print(check_blas())", OPENBLAS_CORETYPE="Sandybridge")
    assert out.stdout.strip() == "openblas Sandybridge"
    assert "not OPENBLAS_CORETYPE=Haswell" in out.stderr
