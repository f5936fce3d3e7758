"""Personalization pipeline: one module per stage, no Airflow imports.

Importing the package pins the OpenBLAS kernels, numpy's SIMD level and the BLAS thread count
before numpy loads, so that the same data and seed do not give other lists on another x86-64
machine with AVX2 just because those libraries picked other kernels (:mod:`pipeline.core.runtime`).
"""

from pipeline.core.runtime import pin_numerics as _pin_numerics

__version__ = "0.1.0"

_pin_numerics()
