"""CI's slice of the architecture sweep: ``benchmarks/coverage.py --quick`` passes on every type it runs.

The full sweep (every model type of the installed transformers, docs/architectures.md) runs by
hand; this keeps one model of each family limeify supports passing its checks (identity exact,
routers active, cached generation) as the code changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import coverage  # noqa: E402


def test_quick_sweep_passes(tmp_path):
    jsonl, out = tmp_path / "results.jsonl", tmp_path / "coverage.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "coverage.py"), "--quick", "--jsonl", str(jsonl),
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["type"]: r for r in map(json.loads, jsonl.read_text().splitlines())}
    assert sorted(results) == sorted(coverage.QUICK_TYPES)
    failed = {t: (r["status"], r.get("error")) for t, r in results.items() if r["status"] != "pass"}
    assert not failed, failed
    table = out.read_text()
    assert f"**{len(results)} of {len(results)} buildable types with attention pass**" in table
