"""`limeify analyze` end to end on a tiny checkpoint with an in-memory word-level tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

import limeify
from limeify.cli import main

from conftest import make_llama

WORDS = "the cat is here the dogs are there it was late they were early and so on".split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 3 for i, w in enumerate(sorted(set(WORDS)))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


@pytest.mark.parametrize("mechanism", ["static", "dynamic"])
def test_analyze_cli_writes_report(tmp_path, mechanism):
    src = tmp_path / "ckpt"
    make_llama().save_pretrained(src)
    _tokenizer().save_pretrained(src)
    dst = tmp_path / "lime"
    assert main(["convert", str(src), str(dst), "--mechanism", mechanism, "--init", "paper"]) == 0
    text = tmp_path / "text.txt"
    torch.manual_seed(0)
    text.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (600,)).tolist()))
    out = tmp_path / "report"
    assert main(["analyze", str(dst), "--text", str(text), "--out", str(out), "--seq-len", "32", "--max-chunks", "6"]) == 0
    report = (out / "report.md").read_text()
    assert report.startswith("# LIMe analysis\n\n| | base | limeified |")
    for name in ("router_heatmap.png", "entropy.png", "probe.png"):
        assert (out / name).stat().st_size > 1000
    data = json.loads((out / "analysis.json").read_text())
    assert len(data["entropy"]["base"]) == 4 and data["summary"]["tokens"] == 6 * 32
    heat = torch.tensor(data["heatmap"], dtype=torch.float64)
    assert torch.allclose(heat.nan_to_num(0).sum(1), torch.ones(2, dtype=torch.float64))
    # paper init puts weight on earlier layers, so the limeified model's hidden states differ
    assert data["entropy"]["base"][-1] != data["entropy"]["limeified"][-1]
    assert (out / "circuits.md").exists() == (mechanism == "dynamic")


def test_heatmap_matches_hand_set_static_router(tmp_path):
    model = limeify.limeify(make_llama())
    with torch.no_grad():
        w1, w2 = limeify.router_parameters(model)
        w1.copy_(torch.tensor([[1.0, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 2.0]]))
        w2.zero_()
        w2[:, 4:] = torch.eye(2)
    from limeify.analysis import router_heatmap

    heat = router_heatmap(limeify.router_parameters(model), 2)
    # layer 1: source 0 mean |w| = (1+1+0+0)/4 = .5, source 1 = (2+0+0+2)/4 = 1 -> 1/3, 2/3
    assert torch.allclose(heat[0, :2], torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    assert torch.allclose(heat[1], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_analyze_says_what_its_numbers_rest_on(tmp_path):
    from limeify.report import analyze

    model = limeify.limeify(make_llama(), limeify.LimeConfig(mechanism="dynamic"))  # identity init: untrained
    torch.manual_seed(0)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (600,)).tolist()]
    with pytest.warns(UserWarning) as caught:
        summary = analyze(model, _tokenizer(), " ".join(words), tmp_path, seq_len=32, max_chunks=6,
                          progress=lambda it, desc: it)
    used = words[: 6 * 32]  # the tokenizer maps each word to one token; analyze reads 6 chunks of 32
    expected = {w: used.count(w) for w in ("is", "are", "was", "were") if w in WORDS}
    assert summary["probe_tokens"] == expected
    messages = " ".join(str(w.message) for w in caught)
    assert "at identity" in messages and "ties everywhere" in messages and f"{sum(expected.values())} tokens" in messages
    report = (tmp_path / "report.md").read_text()
    assert report.count("**Note:**") == 3 and not (tmp_path / "circuits.md").exists()
