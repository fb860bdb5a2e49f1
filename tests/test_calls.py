"""Each forward call of a limeified model owns its raw K/V: calls never see each other's state.

Whatever runs between a forward and its backward (more grad forwards, no_grad or
inference_mode forwards, forwards whose graph is dropped, other threads, activation
recomputation in backward), every call must mix the raw K/V of its own layers only, and its
backward must produce the gradients it would produce alone.

The reference for gradients is always the same loss computed term by term: for
``L = sum_i loss_i``, zero the grads, forward and backward each term on its own, and sum the
collected grads. Gradients of every parameter are compared (the routers, and base weights
such as layer 0's K projection, whose raw K gets gradient from every later layer's mix), in
float64 to 1e-6 relative. Only limeify's public API is used.
"""

from __future__ import annotations

import dataclasses
import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import limeify
from limeify import LimeConfig

from conftest import make_gpt2, make_llama

LAYERS = 5
RTOL = 1e-6
BUILDERS = {"llama": make_llama, "gpt2": make_gpt2}
# A base weight producing layer 0's raw K (and, for GPT-2, Q and V): its gradient flows back
# through every later layer's mix, so it catches cross-layer gradient mix-ups.
LAYER0_K = {"llama": "model.layers.0.self_attn.k_proj.weight", "gpt2": "transformer.h.0.attn.c_attn.weight"}

_SITES: dict[str, list] = {}


# --- helpers -------------------------------------------------------------------------------


def _sites(kind):
    """Attention sites discovered once per model kind (tracing is slow; discovery has its own tests)."""
    if kind not in _SITES:
        _SITES[kind] = limeify.discover_sites(BUILDERS[kind](layers=LAYERS))
    return _SITES[kind]


def _model(kind, dtype=torch.float64, train=True):
    """A tiny limeified model with routers perturbed away from identity (fixed seed)."""
    model = BUILDERS[kind](layers=LAYERS).to(dtype)
    limeify.limeify(model, LimeConfig(sites=_sites(kind)))
    return _perturb(model).train(train)


def _perturb(model):
    torch.manual_seed(5)
    with torch.no_grad():
        for w in limeify.router_parameters(model):
            w.add_(0.3 * torch.randn_like(w))
    return model


def _ids(seed, batch, seq):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 60, (batch, seq), generator=g)


def _checkpointing(model, on, reentrant=False):
    if on:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        assert model.is_activation_checkpointing
    else:
        model.activation_checkpointing_disable()
        assert not model.is_activation_checkpointing


def _ids_term(x):
    """A loss term: the LM loss of ``model(x, labels=x)``."""
    return lambda model: model(x, labels=x).loss


def _embeds_term(x, embeds):
    """A loss term fed ``inputs_embeds`` (the very tensor object given, every time it is called)."""
    return lambda model: model(inputs_embeds=embeds, labels=x).loss


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        out[name] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
    return out


def _reference_grads(model, terms):
    """Each term forward+backward on its own (grads zeroed each time); the grads summed."""
    total = None
    for term in terms:
        model.zero_grad(set_to_none=True)
        term(model).backward()
        g = _grads(model)
        total = g if total is None else {k: total[k] + g[k] for k in total}
    model.zero_grad(set_to_none=True)
    return total


def _joint_grads(model, terms):
    """All forwards first, then one backward of the summed loss."""
    model.zero_grad(set_to_none=True)
    losses = [term(model) for term in terms]
    torch.stack(losses).sum().backward()
    g = _grads(model)
    model.zero_grad(set_to_none=True)
    return g


def _rel_err(a, b):
    """max |a - b| / max |b| (b the reference)."""
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def _assert_close(actual, expected, what=""):
    """Every tensor of ``actual`` equals the reference ``expected`` to RTOL relative."""
    if isinstance(expected, torch.Tensor):
        assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        err = _rel_err(actual, expected)
        assert err <= RTOL, f"{what}: relative error {err:.3g} > {RTOL}"
        return
    assert actual.keys() == expected.keys()
    errs = {name: _rel_err(actual[name], expected[name]) for name in expected}
    bad = sorted(((e, n) for n, e in errs.items() if not e <= RTOL), reverse=True)
    assert not bad, (
        f"{what}: {len(bad)}/{len(errs)} parameter gradients differ from the term-by-term reference; worst: "
        + ", ".join(f"{n}: {e:.3g}" for e, n in bad[:6])
    )


def _check_reference_is_meaningful(model, kind, grads):
    """The reference exercises what the comparisons must catch: router and layer-0 K gradients."""
    names = {id(p): n for n, p in model.named_parameters()}
    routers = limeify.router_parameters(model)
    assert len(routers) == LAYERS - 1
    for w in routers:
        assert grads[names[id(w)]].abs().sum() > 0
    assert grads[LAYER0_K[kind]].abs().sum() > 0


def _eval_logits(model, x):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x).logits
    finally:
        model.train(was)


# --- (a) several grad forwards, then one backward --------------------------------------------

# Each case: (seed, batch, seq) per forward.
FORWARDS = {
    "two_shapes": [(11, 2, 7), (12, 1, 9)],
    "three_shapes": [(11, 2, 7), (12, 1, 9), (13, 2, 6)],
    "two_equal_shapes": [(11, 2, 8), (12, 2, 8)],
    "three_equal_shapes": [(11, 2, 8), (12, 2, 8), (13, 2, 8)],
}


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("case", list(FORWARDS))
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_several_forwards_then_one_backward(kind, case, ckpt):
    model = _model(kind)
    terms = [_ids_term(_ids(*spec)) for spec in FORWARDS[case]]
    expected = _reference_grads(model, terms)  # checkpointing off: independent of recomputation
    _check_reference_is_meaningful(model, kind, expected)
    _checkpointing(model, ckpt)
    _assert_close(_joint_grads(model, terms), expected, f"{kind} {case} ckpt={ckpt}")


@pytest.fixture
def without_checkpoint_frames(monkeypatch):
    """Recomputation finds its call only through input marks, the path for checkpointing
    implementations other than torch's non-reentrant one (limeify/calls.py)."""
    monkeypatch.setattr(limeify.calls, "_checkpoint_frame", lambda: None)


@pytest.mark.parametrize("case", ["three_shapes", "three_equal_shapes"])
def test_several_forwards_found_through_input_marks(case, without_checkpoint_frames):
    """BERT is post-norm: its K/V projections read the layer's own input, so a recomputed layer
    finds its call through the mark that tensor got in the forward."""
    from conftest import make_bert

    model = _perturb(limeify.limeify(make_bert().double())).train()
    terms = [lambda m, x=_ids(*spec): m(x).last_hidden_state.square().mean() for spec in FORWARDS[case]]
    expected = _reference_grads(model, terms)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    _assert_close(_joint_grads(model, terms), expected, f"bert {case} through input marks")


def test_vit_layers_checkpointed_by_transformers_find_their_call():
    """transformers checkpoints a layer's forward body, not its module call, and a ViT attention
    module gets nothing but the freshly normalised hidden state: only the frame leads back."""
    from conftest import make_vit

    model = _perturb(limeify.limeify(make_vit().double())).train()
    xs = [torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    terms = [lambda m, x=x: m(x).logits.square().mean() for x in xs]
    expected = _reference_grads(model, terms)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    _assert_close(_joint_grads(model, terms), expected, "ViT, two forwards, checkpointed layers")


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_same_input_ids_tensor_twice(kind, ckpt):
    """R-Drop style: the same input_ids tensor through two forwards, one backward of both losses."""
    model = _model(kind)
    x = _ids(21, 2, 8)
    terms = [_ids_term(x), _ids_term(x)]
    expected = _reference_grads(model, terms)
    _check_reference_is_meaningful(model, kind, expected)
    _checkpointing(model, ckpt)
    _assert_close(_joint_grads(model, terms), expected, f"{kind} same input_ids twice ckpt={ckpt}")


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_same_inputs_embeds_tensor_twice(kind, ckpt):
    """The same inputs_embeds tensor object through two forwards. LLaMA hands it to layer 0 as is;
    the other inputs of that layer (rotary cos/sin, made per call) tell the two calls apart."""
    model = _model(kind)
    x = _ids(22, 2, 8)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(x).detach()
    terms = [_embeds_term(x, embeds), _embeds_term(x, embeds)]
    expected = _reference_grads(model, terms)
    assert expected[LAYER0_K[kind]].abs().sum() > 0
    _checkpointing(model, ckpt)
    _assert_close(_joint_grads(model, terms), expected, f"{kind} same inputs_embeds twice ckpt={ckpt}")


class _CheckpointedStack(torch.nn.Module):
    """A user's stack of blocks, each checkpointed as a module."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = blocks

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return x


def _attention_stack():
    """nanoGPT's attention modules as blocks, without norms: layer 0's K/V projection reads the
    caller's tensor itself."""
    from conftest import make_nano

    nano = make_nano().double()
    sites = limeify.discover_sites(nano, example_inputs=torch.randint(3, 50, (1, 9)))
    stack = _CheckpointedStack(torch.nn.ModuleList(b.attn for b in nano.blocks)).train()
    strip = lambda path: path.replace(".attn", "")  # noqa: E731
    sites = [dataclasses.replace(s, attention=strip(s.attention), key=dataclasses.replace(s.key, module=strip(s.key.module)),
                                 value=dataclasses.replace(s.value, module=strip(s.value.module))) for s in sites]
    return _perturb(limeify.limeify(stack, LimeConfig(sites=sites)))


def test_recomputation_that_cannot_tell_its_call_raises_and_model_keeps_working(without_checkpoint_frames):
    stack = _attention_stack()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    loss = stack(x).square().sum() + stack(x).sum()
    with pytest.raises(limeify.LimeError, match="cannot tell which call"):
        loss.backward()
    del loss
    stack.zero_grad(set_to_none=True)
    terms = [lambda m: m(x).square().sum(), lambda m: m(x.clone()).sum()]  # distinct tensors: fine
    expected = _reference_grads(stack, terms)
    _assert_close(_joint_grads(stack, terms), expected, "distinct tensors after a refusal")


def test_same_tensor_into_checkpointed_user_blocks_is_exact():
    """With torch's checkpoint frames, even the same input tensor in two calls is told apart."""
    stack = _attention_stack()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    terms = [lambda m: m(x).square().sum(), lambda m: m(x).sum()]
    expected = _reference_grads(stack, terms)  # one call in flight at a time
    _assert_close(_joint_grads(stack, terms), expected, "same tensor, checkpointed blocks")


# --- (b) no_grad / inference_mode forwards between a forward and its backward ----------------


# The other forwards' inputs: other lengths and batch sizes, or exactly the grad forward's shape
# (where reading another call's state would fit silently).
BETWEEN = {"other_shapes": [(32, 1, 5), (33, 2, 11)], "same_shape": [(32, 2, 8), (33, 2, 8)]}


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("between", list(BETWEEN))
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_no_grad_and_inference_forwards_between_forward_and_backward(kind, between, ckpt):
    model = _model(kind)
    x = _ids(31, 2, 8)
    y, z = (_ids(*spec) for spec in BETWEEN[between])
    expected = _reference_grads(model, [_ids_term(x)])
    _check_reference_is_meaningful(model, kind, expected)
    y_ref, z_ref = _eval_logits(model, y), _eval_logits(model, z)
    _checkpointing(model, ckpt)

    model.zero_grad(set_to_none=True)
    loss = model(x, labels=x).loss
    with torch.no_grad():
        y_out = model(y).logits
    with torch.inference_mode():
        z_out = model(z).logits
    loss.backward()
    _assert_close(_grads(model), expected, f"{kind} ckpt={ckpt}: grads after no_grad/inference forwards")
    _assert_close(y_out, y_ref, "no_grad forward during a pending backward")
    _assert_close(z_out, z_ref, "inference_mode forward during a pending backward")
    # And the model is left as it was: a fresh eval forward still gives the same outputs.
    _assert_close(_eval_logits(model, y), y_ref, "no_grad forward afterwards")


# --- (c) gradient accumulation ---------------------------------------------------------------


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradient_accumulation_over_micro_batches(kind, ckpt):
    model = _model(kind)
    terms = [_ids_term(_ids(*spec)) for spec in [(41, 2, 8), (42, 1, 6), (43, 2, 8)]]
    expected = _reference_grads(model, terms)
    _check_reference_is_meaningful(model, kind, expected)
    _checkpointing(model, ckpt)
    model.zero_grad(set_to_none=True)
    for term in terms:
        term(model).backward()  # .grad accumulates across micro-batches
    _assert_close(_grads(model), expected, f"{kind} accumulation ckpt={ckpt}")


# --- (d) a grad forward whose graph is dropped ------------------------------------------------


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dropped_graph_does_not_change_later_gradients(kind, ckpt):
    model = _model(kind)
    x, y = _ids(51, 2, 8), _ids(52, 2, 8)  # equal shapes: silent reuse of y's state would fit
    expected = _reference_grads(model, [_ids_term(x)])
    _check_reference_is_meaningful(model, kind, expected)
    _checkpointing(model, ckpt)

    # dropped before the forward
    out = model(y, labels=y)
    del out
    _assert_close(_joint_grads(model, [_ids_term(x)]), expected, "dropped graph before the forward")
    # dropped between the forward and its backward
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=x).loss
    out = model(y, labels=y)
    del out
    loss.backward()
    _assert_close(_grads(model), expected, "dropped graph between forward and backward")


def _live_tensors():
    gc.collect()
    # issubclass(type(o)), not isinstance: isinstance reads __class__, which some objects
    # (torch.distributed's deprecated reduce_op) answer with a warning.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dropped_graphs_do_not_accumulate_memory(kind, ckpt):
    model = _model(kind, dtype=torch.float32)
    _checkpointing(model, ckpt)
    x, y = _ids(53, 2, 8), _ids(54, 2, 8)
    others = [_ids(55, 1, 5), _ids(56, 2, 12)]  # no_grad forwards of two other shapes
    counts = {}
    for i in range(1, 51):
        out = model(y, labels=y)
        del out
        model.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()
        with torch.no_grad():
            model(others[i % 2])
        if i in (5, 50):
            counts[i] = _live_tensors()
    assert counts[50] <= counts[5], f"live tensors grew from {counts[5]} (5 repetitions) to {counts[50]} (50)"


# --- (e) threads ----------------------------------------------------------------------------

GEN_KW = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
# (seed, batch, seq): different lengths and batch sizes, and two inputs of equal shape.
THREAD_INPUTS = [(61, 1, 4), (62, 2, 6), (63, 2, 6), (64, 3, 5), (65, 1, 8), (66, 2, 3)]


def _forward_call(model, x):
    with torch.no_grad():
        return ("forward", model(x).logits)


def _generate_call(model, x):
    out = model.generate(x, attention_mask=torch.ones_like(x), **GEN_KW)
    return ("generate", out.sequences, torch.stack(out.logits, 1))


def _check_call_result(got, want, what):
    assert got[0] == want[0]
    if got[0] == "forward":
        _assert_close(got[1], want[1], what)
    else:
        assert torch.equal(got[1], want[1]), f"{what}: generated {got[1].tolist()} != {want[1].tolist()}"
        _assert_close(got[2], want[2], what + " (step logits)")


def test_threads_forward_and_generate_match_single_threaded():
    model = _model("llama", dtype=torch.float32, train=False)
    inputs = [_ids(*spec) for spec in THREAD_INPUTS]
    calls = [(fn, i) for i in range(len(inputs)) for fn in (_forward_call, _generate_call)]
    expected = {(fn, i): fn(model, inputs[i]) for fn, i in calls}  # single-threaded first
    jobs = [calls[(7 * n) % len(calls)] for n in range(200)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [(job, pool.submit(job[0], model, inputs[job[1]])) for job in jobs]
        results = [(job, f.result(timeout=300)) for job, f in futures]
    for n, ((fn, i), got) in enumerate(results):
        _check_call_result(got, expected[(fn, i)], f"call {n} ({fn.__name__} on input {THREAD_INPUTS[i]})")


def test_thread_training_while_others_generate():
    model = _model("llama", train=False)  # float64; no dropout, so eval mode trains the same
    train_inputs = [_ids(71, 2, 8), _ids(72, 1, 6)]
    expected_grads = [_reference_grads(model, [_ids_term(x)]) for x in train_inputs]
    _check_reference_is_meaningful(model, "llama", expected_grads[0])
    gen_inputs = [_ids(*spec) for spec in THREAD_INPUTS]
    expected_gen = [_generate_call(model, x) for x in gen_inputs]
    started = threading.Event()

    def train(steps=8):
        got = []
        for s in range(steps):
            started.set()
            x = train_inputs[s % 2]
            model.zero_grad(set_to_none=True)
            model(x, labels=x).loss.backward()
            got.append((s % 2, _grads(model)))
        return got

    def generate(i):
        started.wait(timeout=60)
        return i, _generate_call(model, gen_inputs[i])

    with ThreadPoolExecutor(max_workers=4) as pool:
        trainer = pool.submit(train)
        gens = [pool.submit(generate, n % len(gen_inputs)) for n in range(30)]
        trained = trainer.result(timeout=300)
        generated = [f.result(timeout=300) for f in gens]
    for s, (which, grads) in enumerate(trained):
        _assert_close(grads, expected_grads[which], f"training step {s} while other threads generate")
    for n, (i, got) in enumerate(generated):
        _check_call_result(got, expected_gen[i], f"generate call {n} on input {THREAD_INPUTS[i]}")


def test_checkpointed_attention_modules_find_their_call():
    """Checkpointing a unit below the layer (here each attention module) is found too."""
    from conftest import make_nano

    def ckpt_attention(block):
        def forward(x):
            x = x + torch.utils.checkpoint.checkpoint(block.attn, block.ln_1(x), use_reentrant=False)
            return x + block.mlp(block.ln_2(x))
        return forward

    model = make_nano().double().train()
    limeify.limeify(model, example_inputs=torch.randint(3, 50, (1, 9)))
    _perturb(model)
    xs = [torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    terms = [lambda m, x=x: m(x).square().mean() for x in xs]
    expected = _reference_grads(model, terms)
    for block in model.blocks:
        block.forward = ckpt_attention(block)
    _assert_close(_joint_grads(model, terms), expected, "two forwards, checkpointed attention modules")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_forwards_on_other_threads_backward_on_this_one(kind):
    """Recomputation runs on the thread that calls backward (on GPU: autograd's device thread),
    where none of the forwards' calls were ever open: it finds each call through its inputs."""
    model = _model(kind)
    xs = [_ids(91, 2, 8), _ids(92, 2, 8)]
    expected = _reference_grads(model, [_ids_term(x) for x in xs])
    _checkpointing(model, True)
    model.zero_grad(set_to_none=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        losses = [f.result(timeout=300) for f in [pool.submit(_ids_term(x), model) for x in xs]]
    torch.stack(losses).sum().backward()
    _assert_close(_grads(model), expected, "forwards on worker threads, one backward here")


# --- (f) reentrant checkpointing ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_reentrant_checkpointing_raises_and_leaves_model_working(kind):
    model = _model(kind)
    x = _ids(81, 2, 8)
    expected = _reference_grads(model, [_ids_term(x)])
    _checkpointing(model, True, reentrant=True)
    model.zero_grad(set_to_none=True)
    with pytest.raises(limeify.LimeError) as info:
        model(x, labels=x).loss.backward()
    assert "use_reentrant=False" in str(info.value)
    # The failed call leaves nothing behind: non-reentrant checkpointing and no checkpointing
    # both still give exact gradients.
    _checkpointing(model, True)
    _assert_close(_joint_grads(model, [_ids_term(x)]), expected, "non-reentrant after the refused call")
    _checkpointing(model, False)
    _assert_close(_joint_grads(model, [_ids_term(x)]), expected, "plain after the refused call")
