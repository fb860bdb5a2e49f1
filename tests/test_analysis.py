import math

import numpy as np
import pytest
import torch

from limeify.analysis import (
    circuits_report_markdown,
    layerwise_probe,
    layerwise_renyi_entropy,
    plot_lines,
    plot_router_heatmap,
    probe_separability,
    renyi_entropy,
    router_heatmap,
    top_tokens,
)


def _zero_mean_orthonormal(t: int, seed: int = 0) -> torch.Tensor:
    """[T, T-1] orthonormal columns, all orthogonal to the all-ones vector."""
    g = torch.Generator().manual_seed(seed)
    a = torch.cat([torch.ones(t, 1, dtype=torch.float64), torch.randn(t, t - 1, generator=g, dtype=torch.float64)], 1)
    q, _ = torch.linalg.qr(a)
    return q[:, 1:]


# ----------------------------------------------------------------------------- entropy


@pytest.mark.parametrize("m", [1, 3, 7])
def test_entropy_equal_eigenvalues_is_log_rank(m):
    t = 8
    # sqrt(T) * orthonormal zero-mean columns are already z-scored (population std 1), so
    # the Gram matrix is T * Q Q^T: m equal eigenvalues.
    z = math.sqrt(t) * _zero_mean_orthonormal(t)[:, :m]
    assert renyi_entropy(z) == pytest.approx(math.log(m), abs=1e-9)
    # Per-column affine maps (including sign flips) must be undone by the z-scoring.
    scale = torch.tensor([3.0, -0.2, 7.0, 1.5, -4.0, 0.01, 2.0])[:m].double()
    assert renyi_entropy(z * scale + 5.0) == pytest.approx(math.log(m), abs=1e-9)


def test_entropy_known_unequal_spectrum():
    t = 10
    q = math.sqrt(t) * _zero_mean_orthonormal(t, seed=1)
    # Three copies of one direction and one of another: eigenvalues 3T and T, p = (3/4, 1/4).
    z = torch.stack([q[:, 0], q[:, 0], q[:, 0], q[:, 1]], dim=1).float()
    p = [0.75, 0.25]
    assert renyi_entropy(z, alpha=0.5) == pytest.approx(2 * math.log(math.sqrt(0.75) + math.sqrt(0.25)), abs=1e-6)
    assert renyi_entropy(z, alpha=2.0) == pytest.approx(-math.log(sum(x**2 for x in p)), abs=1e-6)
    assert renyi_entropy(z, alpha=1.0) == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-6)


def test_entropy_rank_one_is_zero():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(16, 1, generator=g, dtype=torch.float64)
    v = torch.randn(1, 12, generator=g, dtype=torch.float64)
    # Every token points the same way; a column constant up to rounding (a few ulps of
    # 0.1) must contribute nothing rather than be blown up to unit variance.
    almost_constant = 0.1 + 2e-17 * torch.randn(16, 1, generator=g, dtype=torch.float64)
    assert almost_constant.std() > 0
    x = torch.cat([c * v, almost_constant], dim=1)
    assert abs(renyi_entropy(x)) < 1e-6
    assert renyi_entropy(torch.full((5, 4), 0.3)) == 0.0


@pytest.mark.parametrize("shape", [(6, 20), (30, 8)])
def test_entropy_matches_svd(shape):
    x = np.random.default_rng(0).normal(size=shape) * np.arange(1, shape[1] + 1) + 3.0
    z = (x - x.mean(0)) / x.std(0)
    lam = np.linalg.svd(z, compute_uv=False) ** 2
    p = lam / lam.sum()
    expected = np.log(np.sum(p**0.5)) / 0.5
    assert renyi_entropy(torch.tensor(x, dtype=torch.float32)) == pytest.approx(expected, abs=1e-4)


def test_layerwise_entropy_uses_mask_and_averages_batch():
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(2, 9, 5, generator=g) for _ in range(3)]
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    for layer in hs:
        layer[1, 6:] = 1e3 * torch.randn(3, 5, generator=g)  # garbage padding
    got = layerwise_renyi_entropy(hs, attention_mask=mask)
    for layer, value in zip(hs, got):
        expected = (renyi_entropy(layer[0]) + renyi_entropy(layer[1, :6])) / 2
        assert value == pytest.approx(expected, abs=1e-9)
    assert layerwise_renyi_entropy(hs)[0] != pytest.approx(got[0], abs=1e-3)


# ----------------------------------------------------------------------------- routers


def test_router_heatmap_cross_head():
    r1 = torch.tensor([[1.0, -1.0, 0.5, 0.5], [0.0, 2.0, 0.5, -0.5]])
    r2 = torch.tensor([[0.1, 0.0, 0.0, 0.0, 1.0, 0.0], [0.0, -0.3, 0.0, 0.0, 0.0, 1.0]])
    m = router_heatmap([r1, r2], num_kv_heads=2)
    # r1: source 0 block mean |w| = (1+1+0+2)/4 = 1, source 1 = 0.5.
    # r2: source 0 = (0.1+0.3)/4 = 0.1, source 1 = 0, source 2 = 2/4 = 0.5.
    expected = torch.tensor([[2 / 3, 1 / 3, math.nan], [1 / 6, 0.0, 5 / 6]], dtype=torch.float64)
    assert m.shape == (2, 3)
    torch.testing.assert_close(m, expected, equal_nan=True)


def test_router_heatmap_per_source_and_bad_shapes():
    w1 = torch.tensor([[1.0, 3.0], [-1.0, 1.0], [1.0, 2.0]])  # 3 heads, 2 sources
    w2 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    m = router_heatmap([w1, w2], num_kv_heads=3, per_source=True)
    expected = torch.tensor([[1 / 3, 2 / 3, math.nan], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(m, expected, equal_nan=True)
    with pytest.raises(ValueError):
        router_heatmap([torch.zeros(2, 5)], num_kv_heads=2)
    with pytest.raises(ValueError):
        router_heatmap([torch.zeros(3, 6)], num_kv_heads=2)


# ----------------------------------------------------------------------------- probes


def test_probe_separable_classes():
    g = torch.Generator().manual_seed(0)
    n, d = 300, 16
    labels = torch.arange(n) % 3
    means = 6.0 * torch.eye(3, d)
    x = torch.randn(n, d, generator=g) + means[labels] + 100.0  # offset: needs standardizing
    assert probe_separability(x, labels + 10) > 0.95


def test_probe_standardizes_features():
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(300) % 2
    x = torch.randn(300, 8, generator=g)
    # The only informative feature is tiny: without standardization the L2 penalty
    # keeps the probe from using it.
    x[:, 0] = 1e-4 * (torch.randn(300, generator=g) + 6.0 * labels)
    assert probe_separability(x, labels) > 0.95


def test_probe_random_labels_near_chance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 10, generator=g)
    labels = torch.randint(0, 2, (400,), generator=g)
    with torch.no_grad():  # the probe must still train when called under no_grad
        acc = probe_separability(x, labels)
    assert 0.3 < acc < 0.7


def test_layerwise_probe_tracks_information_and_mask():
    g = torch.Generator().manual_seed(0)
    b, t, d = 8, 64, 12
    ids = torch.randint(0, 10, (b, t), generator=g)
    groups = {"a": [1, 2], "b": [3, 4]}
    sign = torch.zeros(b, t)
    sign[torch.isin(ids, torch.tensor([1, 2]))] = 1.0
    sign[torch.isin(ids, torch.tensor([3, 4]))] = -1.0
    mask = torch.ones(b, t, dtype=torch.long)
    mask[:, t // 2 :] = 0
    sign[:, t // 2 :] *= -1  # padding carries the opposite signal, so it must be dropped
    direction = torch.randn(d, generator=g)
    noise = torch.randn(b, t, d, generator=g)
    layer1 = torch.randn(b, t, d, generator=g) + 4.0 * sign[..., None] * direction
    accs = layerwise_probe([noise, layer1], ids, groups, attention_mask=mask)
    assert accs[0] < 0.7
    assert accs[1] > 0.95
    assert layerwise_probe([layer1], ids, groups)[0] < 0.75
    with pytest.raises(ValueError):
        layerwise_probe([layer1], ids, {"a": [1, 2], "b": [2, 3]})


# ----------------------------------------------------------------------------- circuits


def test_top_tokens_and_report():
    words = [" the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog", ".", " It", " ran", " off"]
    n, layers, sources, heads = len(words), 2, 2, 2
    scores = 0.1 * torch.rand(n, layers, sources, heads, generator=torch.Generator().manual_seed(0))
    scores[:, 0, 1, :] = math.nan  # layer 0 cannot read source 1
    scores[3, 0, 0, 1] = 0.9  # " fox"
    scores[7, 0, 0, 1] = 0.8  # " dog"
    scores[0, 1, 1, 0] = 0.95  # " the", at the sequence start
    scores[11, 1, 0, 1] = 0.7  # " off", at the end
    hits = top_tokens(scores, words, k=2, context=1, layer_indices=[4, 9])

    assert set(hits) == {(4, 0, 0), (4, 0, 1), (9, 0, 0), (9, 0, 1), (9, 1, 0), (9, 1, 1)}
    fox, dog = hits[(4, 0, 1)]
    assert (fox.position, fox.token, fox.left, fox.right) == (3, " fox", " brown", " jumps")
    assert fox.score == pytest.approx(0.9) and (dog.position, dog.token) == (7, " dog")
    the = hits[(9, 1, 0)][0]
    assert (the.token, the.left, the.right) == (" the", "", " quick")
    off = hits[(9, 0, 1)][0]
    assert (off.token, off.left, off.right) == (" off", " ran", "")
    assert all(len(v) == 2 and v[0].score >= v[1].score for v in hits.values())

    md = circuits_report_markdown(hits, summary_rows=3)
    summary = md.split("## ")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| 9") or line.startswith("| 4")]
    assert [r.split("|")[1:4] for r in rows] == [[" 9 ", " 1 ", " 0 "], [" 4 ", " 0 ", " 1 "], [" 9 ", " 0 ", " 1 "]]
    assert "' fox'" in md and "' dog'" in md and "' the'" in md
    assert " brown⟦ fox⟧ jumps" in md
    assert md.count("## Layer") == 6


def test_report_escapes_markdown():
    hits = top_tokens(torch.tensor([[[[1.0]]], [[[0.5]]]]), ["a|b", "`x`\n"], k=2, context=1)
    md = circuits_report_markdown(hits)
    assert "a\\|b" in md and "\\`x\\`⏎" in md
    assert "a|b" not in md.replace("a\\|b", "")


# ----------------------------------------------------------------------------- plots


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path):
    m = router_heatmap([torch.randn(2, 4), torch.randn(2, 6)], num_kv_heads=2)
    plot_router_heatmap(m, tmp_path / "heat.png", layer_indices=[1, 2])
    plot_lines({"base": [3.0, 2.5, 2.0], "lime": [3.1, 2.9]}, tmp_path / "lines.png", "layer", "entropy", "t")
    assert _is_png(tmp_path / "heat.png")
    assert _is_png(tmp_path / "lines.png")
