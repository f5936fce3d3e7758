"""Personalization pipeline: one module per stage, no Airflow imports.

Importing the package pins the BLAS kernels and thread count before numpy loads OpenBLAS, so
that the same data and seed give the same lists on any x86-64 machine with AVX2
(:mod:`pipeline.runtime`).
"""

from pipeline.runtime import pin_blas as _pin_blas

__version__ = "0.1.0"

_pin_blas()
