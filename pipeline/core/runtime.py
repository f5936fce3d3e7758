"""Numerical runtime settings that decide whether the same data and seed give the same lists.

OpenBLAS and numpy pick their kernels for the CPU they find: on a CPU with AVX-512 they run
other code than on an AVX2 one, and float results differ in the last bits. ALS factors, and
the scores and features computed from them, move with those bits, enough to reorder
near-tied candidates. The MovieLens-100k benchmark's published two-stage row read 0.3514
nDCG@10 at 1998-01-15 on one machine and 0.3394 on another (AVX2), same code, data and seed.
On the second, each of these changed the lists: OpenBLAS's Sandybridge or Prescott kernels
instead of its Haswell ones, and numpy without its AVX2 (``X86_V3``) loops; forcing the
AVX-512 kernels (SkylakeX) died with an illegal instruction.

So :func:`pin_numerics` (run when :mod:`pipeline` is imported, before numpy loads) fixes
both to the AVX2 level on every x86-64 CPU that has AVX2: OpenBLAS's ``Haswell`` kernels
and numpy without its AVX-512 loops; and one BLAS thread (our models parallelise over users
instead). Environment variables already set win, so an operator can choose otherwise.
:func:`check_numerics` reports what is loaded, for the training log, the model bundle and
the MLflow run, and warns when numpy was imported before the pin. Only these two switches are
pinned: XGBoost and implicit run their own compiled loops, which we have not seen switch by
CPU, and only one machine was at hand to compare (its kernels forced to others' choices).
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import MutableMapping
from pathlib import Path

logger = logging.getLogger(__name__)

#: OpenBLAS kernel family used on x86-64 CPUs with AVX2 (every x86 server CPU since 2013-15).
PINNED_CORE = "Haswell"
#: numpy's AVX-512 dispatch targets, by their numpy 2.4 names and older ones (unknown names
#: are ignored): disabled where the BLAS is pinned, so numpy runs its AVX2 loops at most.
NUMPY_DISABLED = (
    "X86_V4 AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX "
    "AVX512_CNL AVX512_ICL AVX512_SPR AVX512FP16"
)
_CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = _CPUINFO) -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where ``/proc/cpuinfo`` is missing)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def pinned_core(machine: str | None = None, flags: frozenset[str] | None = None) -> str | None:
    """The OpenBLAS core to pin on this machine, or None to leave OpenBLAS's own choice
    (not x86-64, or no AVX2: the Haswell kernels would not run there)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return None
    flags = cpu_flags() if flags is None else flags
    return PINNED_CORE if "avx2" in flags else None


def pin_numerics(environ: MutableMapping[str, str] | None = None, core: str | None = None) -> None:
    """Set one BLAS thread, the pinned OpenBLAS kernels and numpy's dispatch ceiling, unless
    the environment already says. ``core``: default :func:`pinned_core` ("" pins nothing).

    Only takes effect if numpy has not been imported yet (see :func:`check_numerics`)."""
    environ = os.environ if environ is None else environ
    environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    core = pinned_core() if core is None else core
    if core:
        environ.setdefault("OPENBLAS_CORETYPE", core)
        environ.setdefault("NPY_DISABLE_CPU_FEATURES", NUMPY_DISABLED)


def blas_cores() -> list[str]:
    """``"<library> <kernel family>"`` for each BLAS numpy and scipy have loaded."""
    import numpy  # noqa: F401  (loads numpy's OpenBLAS)
    import scipy.linalg  # noqa: F401  (loads scipy's, used by implicit's ALS)
    from threadpoolctl import threadpool_info

    return sorted(
        {
            f"{info.get('internal_api')} {info.get('architecture') or '?'}"
            for info in threadpool_info()
            if info.get("user_api") == "blas"
        }
    )


def numpy_simd() -> str:
    """numpy's highest SIMD dispatch target in use (e.g. ``X86_V3``), "" if unknown."""
    try:
        from numpy._core._multiarray_umath import (
            __cpu_baseline__,
            __cpu_dispatch__,
            __cpu_features__,
        )
    except ImportError:  # private names; numpy may move them
        return ""
    active = [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
    return (active or list(__cpu_baseline__) or ["baseline"])[-1]


def check_numerics() -> str:
    """The loaded BLAS kernels and numpy's SIMD level as one string; warns when an OpenBLAS
    runs other kernels than ``OPENBLAS_CORETYPE`` asks (numpy was imported before
    :mod:`pipeline`, so lists may differ from another machine's for the same data and
    seed)."""
    cores = blas_cores()
    wanted = os.environ.get("OPENBLAS_CORETYPE")
    stray = [
        c
        for c in cores
        if c.startswith("openblas ") and wanted and c.split(" ", 1)[1].lower() != wanted.lower()
    ]
    if stray:
        logger.warning(
            "OpenBLAS runs %s, not OPENBLAS_CORETYPE=%s (numpy was loaded before "
            "pipeline): lists can differ from other machines' in the last bits; "
            "import pipeline first or export OPENBLAS_CORETYPE",
            ", ".join(stray),
            wanted,
        )
    simd = numpy_simd()
    return ", ".join(cores + ([f"numpy {simd}"] if simd else []))
