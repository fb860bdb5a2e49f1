"""TRL's DPOTrainer on a router-only LIMe PeftModel, with no separate reference model.

With ``ref_model=None`` and a model that is already a ``PeftModel`` (what ``get_lime_peft_model``
returns), TRL 1.16's ``DPOTrainer.__init__`` adds a second adapter named ``"ref"`` with the
``"default"`` adapter's config and copies every ``.default.`` parameter into its ``.ref.`` twin
(here: the routers' LN-tuning copies). In ``_compute_loss`` it runs the policy forward (with
grad, adapter ``"default"``), then the reference forward under ``torch.no_grad()`` with gradient
checkpointing temporarily disabled and ``use_adapter(model, "ref")`` active, and only then the
policy's backward. So the routers' per-forward value cache sees a second, gradient-free forward
with *different* router weights (from step 2 on, once the policy has moved) between the policy's
forward and its backward, and with non-reentrant checkpointing the policy's layers are recomputed
during that backward.

The tests check that training runs, and that the router gradient TRL's optimizer receives at
every step equals the DPO gradient computed here by hand, through a copy of the base LLaMA whose
K/V projections are mixed by forward hooks written in this file (router matrices as explicit leaf
tensors, float64), independently of limeify's mixing code.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import limeify

from conftest import make_llama

import datasets  # noqa: E402  (a test dependency through trl: a missing one must fail, not skip)
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

LAYERS = 5
BETA = 0.5  # not TRL's default 0.1, so a trainer ignoring the configured beta would be caught
STEPS = 3
LR = 0.05  # large, so that from step 2 on the policy's routers differ clearly from the reference's
CHARS = "abcdefghijklmnopqrstuvwxyz"


# --- tokenizer, data --------------------------------------------------------------------------


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: <pad>=0, <s>=1, </s>=2 (the tiny LLaMA's config ids), a-z = 3..28."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<pad>")


def make_dataset():
    # Different prompt and completion lengths, so batches are right-padded and masks matter.
    return datasets.Dataset.from_dict({
        "prompt": ["abc", "hello", "xy", "dpo", "lime", "qrst"],
        "chosen": ["de", "world", "zzq", "ok", "tree", "uv"],
        "rejected": ["fgh", "there", "a", "nope", "x", "wxyz"],
    })


# --- the hand-written reference: base LLaMA + K/V mixing hooks ----------------------------------


class HandMixedLlama:
    """A float64 copy of the base (never limeified) LLaMA whose K/V projections are mixed by hooks.

    For a forward with matrices ``W = {l: [G, (l+1)G]}``, layer ``l``'s K (and, with the same
    matrix, V) becomes ``out[..., g, :] = sum_j sum_h W_l[g, j*G + h] * raw_j[..., h, :]`` over the
    raw (unmixed) K/V of layers ``j <= l`` of the same forward; layer 0 keeps its raw K/V. The raw
    outputs keep their autograd graph: raw K/V of layer ``j`` depend on the routers of layers
    below ``j`` through the residual stream.
    """

    def __init__(self, base):
        self.model = copy.deepcopy(base).double().eval()
        self.model.requires_grad_(False)
        self.G = self.model.config.num_key_value_heads
        self.raw = {"k": {}, "v": {}}
        self.W: dict[int, torch.Tensor] = {}
        for layer, block in enumerate(self.model.model.layers):
            for role, proj in (("k", block.self_attn.k_proj), ("v", block.self_attn.v_proj)):
                proj.register_forward_hook(self._hook(role, layer))

    def _hook(self, role, layer):
        def hook(module, args, out):
            self.raw[role][layer] = out
            if layer not in self.W:
                return out
            W = self.W[layer]
            G = self.G
            lead, d = out.shape[:-1], out.shape[-1] // G
            assert W.shape == (G, (layer + 1) * G)
            mixed = []
            for g in range(G):
                acc = torch.zeros(*lead, d, dtype=out.dtype)
                for j in range(layer + 1):
                    src = self.raw[role][j].view(*lead, G, d)
                    for h in range(G):
                        acc = acc + W[g, j * G + h] * src[..., h, :]
                mixed.append(acc)
            return torch.stack(mixed, dim=-2).reshape(out.shape)

        return hook

    def completion_logps(self, W: dict[int, torch.Tensor], batch) -> torch.Tensor:
        """Per-sequence sums of the completion tokens' log-probs, as TRL computes them: labels are the
        input ids with prompt and padding masked, shifted by one; logits never see the labels."""
        self.W = W
        self.raw = {"k": {}, "v": {}}
        try:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).logits
        finally:
            self.W, self.raw = {}, {"k": {}, "v": {}}
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = batch["input_ids"][:, 1:]
        mask = batch["completion_mask"][:, 1:].bool()
        per_token = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return (per_token * mask).sum(dim=1)

    def dpo_gradients(self, policy_w, ref_w, batch, beta):
        """d/dW of TRL's sigmoid DPO loss (mean over the pairs) at policy routers ``policy_w``."""
        layers = sorted(policy_w)
        leaves = {l: policy_w[l].detach().double().clone().requires_grad_(True) for l in layers}
        with torch.no_grad():
            ref = self.completion_logps({l: ref_w[l].detach().double() for l in layers}, batch)
        pol = self.completion_logps(leaves, batch)
        pi_c, pi_r = pol.chunk(2)
        ref_c, ref_r = ref.chunk(2)
        loss = -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()
        grads = torch.autograd.grad(loss, [leaves[l] for l in layers])
        return loss.detach(), dict(zip(layers, grads))


# --- one DPO run, recording what TRL fed its model and what its optimizer received ---------------


class RecordingDPOTrainer(DPOTrainer):
    """Keeps a copy of every training batch exactly as ``compute_loss`` receives it."""

    def __init__(self, *args, **kwargs):
        self.recorded_batches = []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.recorded_batches.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class RouterGradRecorder(TrainerCallback):
    """Before each optimizer step (after backward; clipping is off): the routers' values (those the
    step's forward used) and gradients, in layer order."""

    def __init__(self, params):
        self.params = params
        self.weights, self.grads = [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.weights.append([p.detach().clone() for p in self.params])
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for p in self.params])


def run_dpo(tmp_path, gradient_checkpointing: bool):
    base = make_llama(layers=LAYERS)
    hand = HandMixedLlama(base)
    model = copy.deepcopy(base)
    limeify.limeify(model)
    torch.manual_seed(1234)
    with torch.no_grad():
        for w in limeify.router_parameters(model):
            w.add_(0.3 * torch.randn_like(w))
    initial = {r.layer: r.mixing_matrix().detach().clone() for r in limeify.routers(model).values()}
    peft_model = limeify.get_lime_peft_model(model)
    policy_params = limeify.router_parameters(peft_model)  # the "default" adapter's trainable copies
    assert all(p.requires_grad for p in policy_params)
    recorder = RouterGradRecorder(policy_params)

    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        beta=BETA,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping: the recorded gradient is the raw one
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        bf16=False,
        fp16=False,
        use_cpu=True,
        max_length=16,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=True,  # TRL keeps its own signature columns (prompt_ids, chosen_ids, ...)
        seed=0,
    )
    trainer = RecordingDPOTrainer(model=peft_model, ref_model=None, args=args, train_dataset=make_dataset(),
                                  processing_class=make_tokenizer(), callbacks=[recorder])
    trainer.train()
    return dict(trainer=trainer, peft_model=peft_model, hand=hand, initial=initial, recorder=recorder,
                policy_params=policy_params)


def _ref_adapter_weights(peft_model):
    return {name: p.detach().clone() for name, p in peft_model.named_parameters() if ".ref." in name}


# --- tests ------------------------------------------------------------------------------------

GC = pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["no_ckpt", "ckpt_nonreentrant"])


@GC
def test_dpo_trains_router_only_peft_model(tmp_path, gradient_checkpointing):
    run = run_dpo(tmp_path, gradient_checkpointing)
    trainer, peft_model = run["trainer"], run["peft_model"]
    assert trainer.state.global_step == STEPS
    assert trainer.ref_model is None
    assert "ref" in peft_model.peft_config  # TRL's frozen copy of the adapter is the reference
    m = trainer.model
    ckpt = m.is_activation_checkpointing if hasattr(m, "is_activation_checkpointing") else m.is_gradient_checkpointing
    assert ckpt == gradient_checkpointing
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    assert all(torch.isfinite(torch.tensor(losses)))
    assert len(run["recorder"].grads) == STEPS
    for step_grads in run["recorder"].grads:
        assert all(g is not None and torch.isfinite(g).all() for g in step_grads)
    # The policy's routers moved; the reference adapter still holds the initial (perturbed) routers.
    for p, layer in zip(run["policy_params"], sorted(run["initial"])):
        assert (p.detach() - run["initial"][layer]).abs().max().item() > 1e-3
    ref = _ref_adapter_weights(peft_model)
    assert len(ref) == len(run["initial"])
    for name, w in ref.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        assert torch.equal(w, run["initial"][layer]), name


@GC
def test_dpo_router_gradients_match_hand_computed(tmp_path, gradient_checkpointing):
    """Every step's router gradient equals the hand-computed DPO gradient.

    Step 1: policy == reference (both the perturbed routers), so the log-ratios are 0 and the
    loss gradient is -beta/2 * mean(d(pi_c - pi_r)); this checks the policy path and beta (TRL's
    default beta 0.1 instead of 0.5 gives a relative error of 4). A reference equal to the base
    model (adapters disabled, identity routers) would already differ here (loss 0.7009, not log 2).
    Steps 2 and 3: the policy has moved (lr 0.05) while the reference must still be the initial
    routers. The logged loss of each step is compared too (atol 1e-5, loss ~0.69).
    Observed relative errors when the hand computation is made wrong on purpose: a
    reference that follows the policy 2e-3..5e-2, an unperturbed (identity-router) reference
    2e-4..4e-2, policy routers left at their initial values 5e-2..2e-1.

    Tolerance: TRL/limeify run in float32, the hand computation in float64. Each gradient entry
    sums a few hundred float32 products through 5 layers and a log-softmax; the observed error,
    max |got - want| / max |want| per router, is 4e-7..1.2e-6 (float32 epsilon is 1.2e-7). We
    allow 1e-5: ~9x the observed error, 20x below the smallest wrong-on-purpose error.
    """
    run = run_dpo(tmp_path, gradient_checkpointing)
    trainer, hand, initial, recorder = run["trainer"], run["hand"], run["initial"], run["recorder"]
    layers = sorted(initial)
    assert len(trainer.recorded_batches) == STEPS and len(recorder.grads) == STEPS
    assert any((b["attention_mask"] == 0).any() for b in trainer.recorded_batches)  # padding is exercised
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # logging_steps=1: one per step
    assert len(losses) == STEPS
    for step in range(STEPS):
        batch = trainer.recorded_batches[step]
        policy_w = dict(zip(layers, recorder.weights[step]))
        if step == 0:
            for l in layers:
                assert torch.equal(policy_w[l], initial[l])
        loss, expected = hand.dpo_gradients(policy_w, initial, batch, BETA)
        assert abs(loss.item() - losses[step]) <= 1e-5, f"step {step + 1}: loss {losses[step]} vs {loss.item()}"
        for l, got in zip(layers, recorder.grads[step]):
            want = expected[l]
            assert got is not None, f"step {step + 1}, layer {l}: no gradient"
            scale = want.abs().max().item()
            assert scale > 1e-6, f"step {step + 1}, layer {l}: degenerate expected gradient"
            err = (got.double() - want).abs().max().item() / scale
            assert err <= 1e-5, f"step {step + 1}, layer {l}: max relative error {err:.3g}"
