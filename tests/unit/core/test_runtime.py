"""The numerics pin that keeps lists identical across machines (pipeline.core.runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import runtime

REPO = Path(__file__).resolve().parents[3]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OPENBLAS_") and k != "NPY_DISABLE_CPU_FEATURES"
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx avx2 fma\n"
        "processor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
    )
    assert runtime.cpu_flags(cpuinfo) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert runtime.cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("machine", "flags", "expected"),
    [
        ("x86_64", {"sse2", "avx", "avx2"}, "Haswell"),
        ("AMD64", {"avx2", "avx512f"}, "Haswell"),  # AVX-512 machines run the AVX2 kernels too
        ("x86_64", {"sse2", "avx"}, None),  # Haswell kernels would be illegal here
        ("aarch64", {"asimd"}, None),
    ],
)
def test_pinned_core_only_where_the_kernels_run(machine, flags, expected):
    assert runtime.pinned_core(machine, frozenset(flags)) == expected


def test_pin_numerics_sets_what_the_environment_does_not_say():
    env = {"OPENBLAS_CORETYPE": "Sandybridge"}
    runtime.pin_numerics(env, core="Haswell")
    assert env == {
        "OPENBLAS_CORETYPE": "Sandybridge",
        "OPENBLAS_NUM_THREADS": "1",
        "NPY_DISABLE_CPU_FEATURES": runtime.NUMPY_DISABLED,
    }
    assert "X86_V4" in env["NPY_DISABLE_CPU_FEATURES"].split()
    env = {"OPENBLAS_NUM_THREADS": "4"}
    runtime.pin_numerics(env, core="")  # no AVX2: only the thread default
    assert env == {"OPENBLAS_NUM_THREADS": "4"}


def test_importing_pipeline_first_pins_the_loaded_kernels():
    out = _python(
        "import json, os, pipeline, numpy\n"
        "from pipeline.core.runtime import blas_cores, numpy_simd\n"
        "print(json.dumps([os.environ.get('OPENBLAS_CORETYPE'), blas_cores(), "
        "numpy_simd()]))"
    )
    wanted, cores, simd = json.loads(out.stdout)
    assert cores and all(c.startswith("openblas ") for c in cores)
    if runtime.pinned_core() is None:
        assert wanted is None
    else:
        assert wanted == runtime.PINNED_CORE
        assert cores == [f"openblas {runtime.PINNED_CORE}"]
        assert simd == "X86_V3"  # AVX2 loops, never the AVX-512 ones


def _native_numpy_simd() -> str:
    """numpy's SIMD level on this CPU without any pin, read in an interpreter that never
    imports pipeline: what numpy runs when it is loaded first."""
    return _python(
        "import numpy\n"
        "from numpy._core._multiarray_umath import __cpu_baseline__, __cpu_dispatch__, "
        "__cpu_features__\n"
        "active = [n for n in __cpu_dispatch__ if __cpu_features__.get(n)]\n"
        "print((active or list(__cpu_baseline__))[-1])"
    ).stdout.strip()


def test_numpy_simd_reports_the_dispatch_level_numpy_runs():
    if runtime.pinned_core() is None:
        pytest.skip("needs an x86-64 CPU with AVX2")
    # The AVX2 level and every AVX-512 one off: numpy falls back to its X86_V2 baseline on any
    # CPU with AVX2, with or without AVX-512 (disabling X86_V3 alone leaves AVX-512 on).
    out = _python(
        "import pipeline, numpy\nfrom pipeline.core.runtime import numpy_simd\nprint(numpy_simd())",
        NPY_DISABLE_CPU_FEATURES=f"X86_V3 {runtime.NUMPY_DISABLED}",
    )
    assert out.stdout.strip() == "X86_V2"


def test_numpy_left_alone_runs_at_least_the_pinned_level_here():
    """Unpinned, numpy runs X86_V3 on an AVX2-only CPU and an AVX-512 level where the CPU has
    X86_V4's flags: the machines the pin exists for. Both end at X86_V3 when pinned (above)."""
    if runtime.pinned_core() is None:
        pytest.skip("needs an x86-64 CPU with AVX2")
    native = _native_numpy_simd()
    x86_v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= runtime.cpu_flags()
    assert (native != "X86_V3") == x86_v4, (native, x86_v4)


def test_check_numerics_warns_when_numpy_was_loaded_with_other_kernels():
    if runtime.pinned_core() is None:
        pytest.skip("needs an x86-64 CPU with AVX2 (to load the Sandybridge kernels)")
    out = _python(
        "import logging, os, numpy, scipy.linalg\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "os.environ['OPENBLAS_CORETYPE'] = 'Haswell'\n"
        "from pipeline.core.runtime import check_numerics\n"
        "print(check_numerics())",
        OPENBLAS_CORETYPE="Sandybridge",
    )
    # numpy was imported before pipeline, so it runs this CPU's own level (X86_V3 on an AVX2
    # CPU, an AVX-512 level on one with AVX-512): the report says what is really loaded.
    assert out.stdout.strip() == f"openblas Sandybridge, numpy {_native_numpy_simd()}"
    assert "not OPENBLAS_CORETYPE=Haswell" in out.stderr
