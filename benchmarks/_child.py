"""Run one benchmark step in a fresh subprocess, so that its peak RSS is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_child(module: str, args: list[str]) -> tuple[dict, int]:
    """``python -m module *args``; the JSON object on its last stdout line and its peak RSS
    in bytes (``os.wait4`` rusage)."""
    env = {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark step {module} {args[0]} failed with exit code {proc.returncode}"
        )
    return json.loads(out.decode().strip().splitlines()[-1]), usage.ru_maxrss * 1024
