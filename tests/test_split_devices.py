"""A stack split over two devices: each case of split_device_cases.py, in a process of its own
(its second device, ``spare``, cannot be unregistered once a process has it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).resolve().parent / "split_device_cases.py"
NAMES = [n.name for n in ast.parse(CASES.read_text()).body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


@pytest.mark.parametrize("case", NAMES)
def test_split_over_two_devices(case, tmp_path):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging",
           f"{CASES}::{case}", "--basetemp", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=CASES.parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
