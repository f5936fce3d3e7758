"""Numerical runtime settings that decide whether the same data and seed give the same lists.

OpenBLAS picks its kernels for the CPU it finds (``DYNAMIC_ARCH``): on a CPU with AVX-512 it
runs different kernels than on an AVX2 one, and the float results differ in the last bits.
ALS factors and the scores computed from them move with those bits, enough to reorder
near-tied candidates. The MovieLens-100k benchmark's published two-stage row read 0.3514
nDCG@10 at 1998-01-15 on one machine and 0.3394 on another (AVX2, Haswell kernels), same code,
data and seed; on the second, forcing OpenBLAS's Sandybridge or Prescott kernels also changed
the lists, and forcing the AVX-512 ones (SkylakeX) died with an illegal instruction.

So :func:`pin_blas` (run when :mod:`pipeline` is imported, before numpy loads OpenBLAS) fixes
the kernel family to ``Haswell`` on every x86-64 CPU that has AVX2, and uses one BLAS thread
(our models parallelise over users instead). Environment variables already set win, so an
operator can choose otherwise. :func:`blas_cores` reports what is loaded, for the training log
and the MLflow run; :func:`check_blas` warns when numpy was imported before the pin.
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


def pin_blas(environ: MutableMapping[str, str] | None = None,
             core: str | None = None) -> None:
    """Set one BLAS thread and the pinned kernel family, unless the environment already says.

    Only takes effect if numpy has not loaded OpenBLAS yet (see :func:`check_blas`)."""
    environ = os.environ if environ is None else environ
    environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    core = pinned_core() if core is None else core
    if core:
        environ.setdefault("OPENBLAS_CORETYPE", core)


def blas_cores() -> list[str]:
    """``"<library> <kernel family>"`` for each BLAS numpy and scipy have loaded."""
    import numpy  # noqa: F401  (loads numpy's OpenBLAS)
    import scipy.linalg  # noqa: F401  (loads scipy's, used by implicit's ALS)
    from threadpoolctl import threadpool_info

    return sorted({f"{info.get('internal_api')} {info.get('architecture') or '?'}"
                   for info in threadpool_info() if info.get("user_api") == "blas"})


def check_blas() -> str:
    """The loaded BLAS kernels as one string; warns when an OpenBLAS runs other kernels than
    ``OPENBLAS_CORETYPE`` asks (numpy was imported before :mod:`pipeline`, so lists may differ
    from another machine's for the same data and seed)."""
    cores = blas_cores()
    wanted = os.environ.get("OPENBLAS_CORETYPE")
    stray = [c for c in cores if c.startswith("openblas ")
             and wanted and c.split(" ", 1)[1].lower() != wanted.lower()]
    if stray:
        logger.warning("OpenBLAS runs %s, not OPENBLAS_CORETYPE=%s (numpy was loaded before "
                       "pipeline): lists can differ from other machines' in the last bits; "
                       "import pipeline first or export OPENBLAS_CORETYPE", ", ".join(stray),
                       wanted)
    return ", ".join(cores)
