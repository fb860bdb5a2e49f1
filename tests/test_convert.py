"""`limeify convert` and limeify.from_pretrained: atomic output, untouched source, equal logits."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import limeify
from limeify import LimeError

from conftest import example_for, make_llama

ROOT = Path(__file__).resolve().parents[1]


def _checksums(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src"
    make_llama().save_pretrained(path)
    return path


def test_python_dash_m_runs_the_cli(tmp_path):
    run = subprocess.run([sys.executable, "-m", "limeify", "sites", str(tmp_path / "missing")], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    # Only the last line is limeify's: importing torchao (a test dependency) logs its own notices first.
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("limeify: error:"), run.stderr
    assert "Traceback" not in run.stderr


def test_cli_failures_print_one_line_unless_debug(monkeypatch, capsys):
    from limeify import cli

    def broken(args):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(cli, "_sites", broken)
    assert cli.main(["sites", "anything"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("limeify: error: RuntimeError: disk on fire") and err.count("\n") == 1, err
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["--debug", "sites", "anything"])


def test_convert_cli_roundtrip(src, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    from limeify.cli import main

    before = _checksums(src)
    dst = tmp_path / "dst"
    # The installed `limeify` console script, in a real process (the other calls run main() in-process).
    script = Path(sys.executable).parent / "limeify"
    assert script.is_file(), f"no console script at {script}: pip install -e ."
    run = subprocess.run([str(script), "convert", str(src), str(dst)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "max abs logit diff = 0" in run.stdout
    assert "convert: 100%" in run.stderr and "4/4" in run.stderr  # the progress bar
    assert {"config.json", "model.safetensors", "lime_config.json", "lime_routers.safetensors"} <= set(os.listdir(dst))
    assert _checksums(src) == before
    umask = os.umask(0o022)
    os.umask(umask)
    assert dst.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary directory, not mkdtemp's 0700

    x = example_for("llama")
    base = LlamaForCausalLM.from_pretrained(src).eval()
    plain = LlamaForCausalLM.from_pretrained(dst).eval()
    lime = limeify.from_pretrained(dst)
    assert limeify.is_limeified(lime) and not limeify.is_limeified(plain)
    with torch.no_grad():
        ref = base(x).logits
        assert torch.equal(plain(x).logits, ref)
        assert torch.equal(lime(x).logits, ref)

    capsys.readouterr()
    assert main(["convert", str(src), str(dst)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert", str(src), str(dst), "--force", "--init", "paper"]) == 0
    assert _checksums(src) == before


def test_convert_errors(tmp_path, src):
    with pytest.raises(LimeError, match="neither"):
        limeify.convert(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(LimeError, match="exists"):
        limeify.convert(src, tmp_path / "out")
    with pytest.raises(LimeError, match="no lime_config.json"):
        limeify.from_pretrained(src)


SLOW_CONVERT = """
import sys, time
import limeify.conversion as c
real = c.write_lime
def slow(model, path):
    real(model, path)
    print("WRITING", flush=True)
    time.sleep(60)
c.write_lime = slow
c.convert(sys.argv[1], sys.argv[2])
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_interrupted_convert_leaves_no_destination(src, tmp_path, sig):
    before = _checksums(src)
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(src), str(dst)], stdout=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        assert any(line.strip() == "WRITING" for line in iter(proc.stdout.readline, ""))
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".dst.limeify-")]
        assert partial and (partial[0] / "model.safetensors").exists()
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not dst.exists()
    if sig == signal.SIGTERM:
        assert not any(p.name.startswith(".dst.limeify-") for p in tmp_path.iterdir())
    assert _checksums(src) == before


@pytest.mark.real_model
def test_convert_real_smollm2(tmp_path, smollm2):
    from recipes.common import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    dst = tmp_path / "smollm2-lime"
    limeify.convert(gguf, dst)
    base, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    lime = limeify.from_pretrained(dst)
    assert len(limeify.router_parameters(lime)) == 29
    with torch.no_grad():
        ref = base(ids).logits
        out = lime(ids).logits
    assert (out - ref).abs().max().item() <= 1e-4


def test_convert_encoder_decoder_keeps_its_stacks(tmp_path):
    from transformers import BartForConditionalGeneration

    from stack_models import make_bart

    src, dst = tmp_path / "bart", tmp_path / "bart-lime"
    make_bart().save_pretrained(src)
    assert limeify.convert(src, dst, limeify.LimeConfig(init="paper"), verbose=False) > 0
    lime = limeify.from_pretrained(dst)
    stacks = [s.stack for s in limeify.attention_sites(lime)]
    assert len(set(stacks)) == 3 and stacks.count("model.decoder.layers.*.encoder_attn") == 3
    again = limeify.from_pretrained(dst, verify_sites=True)  # the saved sites are what discovery finds
    assert limeify.attention_sites(again) == limeify.attention_sites(lime)
    base = BartForConditionalGeneration.from_pretrained(src).eval()
    ids, dec = torch.randint(3, 60, (2, 7)), torch.randint(3, 60, (2, 5))
    with torch.no_grad():
        # Paper init: the routers mix, so the converted model differs from its base ...
        assert not torch.allclose(lime(input_ids=ids, decoder_input_ids=dec).logits,
                                  base(input_ids=ids, decoder_input_ids=dec).logits, atol=1e-4)
        # ... and equals the base limeified with the saved routers.
        limeify.load_lime(base, dst)
        assert torch.equal(lime(input_ids=ids, decoder_input_ids=dec).logits, base(input_ids=ids, decoder_input_ids=dec).logits)
