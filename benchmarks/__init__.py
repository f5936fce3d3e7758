"""Benchmarks for `make bench`: each `bench_*.py` module has `run(quick: bool) -> None`.

They print comparable numbers (ratios against a baseline measured in the same run, since the
machine is shared and noisy); they are not tests and assert nothing.
"""

import pipeline  # noqa: F401  (before any benchmark loads numpy: pins the BLAS and numpy kernels)
