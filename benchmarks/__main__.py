"""Run the benchmarks: `python -m benchmarks [NAME ...] [--quick]` (default: all)."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import time

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def _available() -> list[str]:
    import benchmarks

    return sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules(benchmarks.__path__)
        if m.name.startswith("bench_")
    )


def main(argv: list[str] | None = None) -> int:
    names = _available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run: {', '.join(names)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in args.names or names:
        started = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        importlib.import_module(f"benchmarks.bench_{name}").run(quick=args.quick)
        print(f"({name}: {time.perf_counter() - started:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
