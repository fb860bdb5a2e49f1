"""benchmarks/bench.py keeps working, and its saved-activation accounting is right."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402


def _numbers(text: str) -> list[float]:
    """Every number in the markdown table rows (thousands separators dropped)."""
    rows = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]
    cells = [c for row in rows for c in row.strip("|").split("|")]
    found = []
    for cell in cells:
        for tok in re.findall(r"[-+]?(?:\d[\d,]*\.?\d*(?:e[-+]?\d+)?|nan|inf)", cell.replace(" ", " "), re.I):
            found.append(float(tok.replace(",", "")))
    return found


def test_quick_run_writes_finite_tables(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.strip() == proc.stdout.strip()  # the printed table is the file
    for heading in ("## Latency", "### Where limeify's overhead goes", "## Activations saved for backward",
                    "## torch.compile", "torch "):
        assert heading in text
    for arch in ("gpt2", "llama-gqa"):
        for label in ("forward", "forward+backward"):
            assert re.search(rf"^\| {arch} \| {re.escape(label)} \| [\d.]+ \| [\d.]+ \|", text, re.M), (arch, label)
    for arch in ("gpt2", "llama-gqa"):
        assert re.search(rf"^\| {arch} \| limeify \|", text, re.M), arch
        assert re.search(rf"^\| {arch} \| naive \|", text, re.M), arch
    numbers = _numbers(text)
    assert len(numbers) > 50
    assert all(math.isfinite(x) for x in numbers), [x for x in numbers if not math.isfinite(x)]
    # limeify's extra saved bytes: exactly one copy of each layer's raw K+V at every depth
    ratios = re.findall(r"\| ([\d.]+) ok \| ([\d.]+) \|$", text, re.M)
    assert ratios and all(float(lime) == 1.0 for lime, _ in ratios)


def test_saved_bytes_by_hand():
    f32 = 4
    x = torch.randn(3, 5, requires_grad=True)
    w = torch.randn(5, requires_grad=True)
    # y = x * w saves both operands: 15 + 5 floats
    assert bench.saved_bytes(lambda: x * w) == (15 + 5) * f32
    # multiplying by a python scalar saves nothing
    assert bench.saved_bytes(lambda: x * 2.0) == 0
    # excluded storages (e.g. parameters) are not counted
    assert bench.saved_bytes(lambda: x * w, exclude={w.untyped_storage().data_ptr()}) == 15 * f32


def test_saved_bytes_counts_an_aliased_storage_once():
    f32 = 4
    base = torch.randn(4, 6)  # 96 bytes, no grad
    w = torch.randn(6, requires_grad=True)

    def fn():
        a, b = base[:2], base[2:]  # two views of one storage, both saved by mul
        return (a * w).sum() + (b * w).sum() + (base * w).sum()

    with bench.SavedBytes() as counter:
        out = fn()
    # only w needs a gradient, so each mul saves its other operand: a, b and base, three views
    # of one 24-float storage, counted once
    assert counter.tensors == 3
    assert counter.bytes == 24 * f32
    del out
    # a saved view keeps its whole storage alive, so it counts the whole storage
    big = torch.randn(100)
    assert bench.saved_bytes(lambda: big[:10] * w[:1].expand(10)) == 100 * f32


def test_naive_reference_matches_limeify_and_grows_with_depth():
    arch = bench.Arch("llama-gqa", 3, 32, 4, 2, 64, 64)
    models = bench.build_variants(arch, None, torch.device("cpu"), torch.float32, 16)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        lime, naive = models["limeify"](x).logits, models["naive"](x).logits
    assert (lime - naive).abs().max().item() < 1e-5
    sizes = {}
    for name, m in models.items():
        sizes[name] = bench.saved_bytes(lambda: m(x, labels=x).loss, bench.parameter_pointers(m))
    raw_kv = 2 * 2 * 8 * 2 * 8 * 4  # K and V, batch 2 x 8 tokens, 2 KV heads x head size 8, fp32
    assert sizes["limeify"] - sizes["base"] == 3 * raw_kv  # one copy of every layer's raw K/V
    # naive: layer 1 saves layers 0-1, layer 2 saves layers 0-2: 5 raw K+V's
    assert sizes["naive"] - sizes["base"] == 5 * raw_kv
