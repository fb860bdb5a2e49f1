#!/usr/bin/env python
"""Which transformers architectures limeify handles: a sweep over every installed model type (issue 16).

For each model type of the installed transformers (``CONFIG_MAPPING_NAMES``) the script picks
the most useful head class the auto mappings offer (causal LM, then seq2seq LM, then
image-text-to-text, then masked LM, then image classification, then the base model, except
that a head using only part of the model gives way, see ``choose_class``; for a sub-model
type without any mapping, e.g. ``clip_text_model``, the model class whose ``config_class`` is
its config), builds it through its auto class from a tiny version of the config's defaults
(random weights, CPU, float32), and then:

1. ``limeify.limeify(copy)`` with default example inputs (built by limeify from the config);
2. **identity**: every floating tensor in the outputs of the limeified model (identity init)
   equals the base model's exactly, on the input limeify builds
   (``limeify.discovery.default_example_inputs``);
3. **routers active**: every router parameter gets Gaussian noise (std 0.3) and the main
   output (the first floating tensor of the outputs: logits, last hidden state...) changes;
4. **cached generate**: for models that can ``generate``, greedy decoding of a few tokens with
   the perturbed routers gives the same tokens with ``use_cache=True`` and ``use_cache=False``.

Configs are shrunk generically by attribute name (never by model name): widths (hidden sizes,
head dims, intermediate sizes...) are divided by one power of two that keeps every relation
between them (``hidden = heads * head_dim``, MLA's ``qk_head_dim = nope + rope``, M-RoPE
sections), layer counts become 2 (for models whose layers differ, e.g. sliding/full
attention or attention/Mamba, one layer of each kind and then a second of each, up to 6, with
per-layer lists and layer indices remapped), experts at most 8-16, vocabularies 1024 (special
token ids remapped into it), positions 512, and image grids 8x8 patches. Sub-configs (``text_config``, ``vision_config``, ``encoder``...) are shrunk the
same way. When a shrunk model cannot be built or does not run on limeify's default inputs,
a milder shrink is tried (vocabulary, positions and image sizes kept), then layers only. A
small table of per-type overrides (``OVERRIDES``, each with its reason) covers what generic
shrinking cannot.

Each type runs in a worker process with a time limit (``signal.alarm``, and a hard kill
behind it), and every exception is caught, so one type cannot stop the sweep.

Examples::

    python benchmarks/coverage.py --quick                 # 12 diverse types, < 2 min on 2 cores
    python benchmarks/coverage.py --types llama,mistral   # chosen types (markdown to a temp file)
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/coverage.py --jobs 2   # all: docs/architectures.md
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One of each family CI must keep passing: decoders (GQA/RoPE, fused qkv, per-head fused, ALiBi),
# encoders, a shared layer, per-layer head sizes, encoder-decoders, towers, speech.
QUICK_TYPES = ["llama", "gpt2", "gpt_neox", "bloom", "bert", "albert", "gemma4_text", "vit", "bart", "t5", "clip", "whisper",
               "switch_transformers"]  # traced part by part (data-dependent expert routing)
DEFAULT_OUT = ROOT / "docs" / "architectures.md"

# Head classes in order of preference: the first mapping that has the model type wins.
# Models are built through the mapping's auto class (``from_config``), as users get them: for a
# composite config it picks the sub-config the head takes.
HEAD_MAPPINGS = [
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal LM", "AutoModelForCausalLM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "seq2seq LM", "AutoModelForSeq2SeqLM"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "speech seq2seq", "AutoModelForSpeechSeq2Seq"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "image-text-to-text", "AutoModelForImageTextToText"),
    ("MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES", "vision2seq", "AutoModelForVision2Seq"),
    ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "multimodal LM", "AutoModelForMultimodalLM"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "masked LM", "AutoModelForMaskedLM"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image classification", "AutoModelForImageClassification"),
    ("MODEL_MAPPING_NAMES", "base model", "AutoModel"),
]

# Per-type config overrides, applied after generic shrinking (key: model type; value: dotted
# attribute path -> value). Only for what generic shrinking cannot know; each says why.
OVERRIDES: dict[str, dict[str, Any]] = {
    # Default vision tower (224 px / patch 16 = 14x14 patches) cannot be average-pooled to the
    # default 256 image tokens (16 per side: kernel 14 // 16 = 0); checkpoints use 896 px.
    # 4 tokens (2 per side) pool both the shrunk 8x8 grid and the default 14x14 one.
    "gemma3": {"mm_tokens_per_image": 4},
    "shieldgemma2": {"mm_tokens_per_image": 4},
    # The default config has no attention layers at all (attn_layer_indices=None; checkpoints
    # list them): make both layers attention layers.
    "bamba": {"attn_layer_indices": [0, 1]},
    # Layers are split into input, recurrent and output blocks whose sizes must add up to the
    # layer count, which generic shrinking cannot know: 2 + 2 + 2 of the default pattern.
    "dory": {"num_hidden_layers": 6, "n_input_layers": 2, "n_recurrent_layers": 2, "n_output_layers": 2,
             "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"]},
}

# Types the sweep does not build at all, with the reason (none needed so far: every type either
# builds or fails within its time limit).
SKIP: dict[str, str] = {}

TINY_VOCAB = 1024
MAX_POSITIONS = 512
MAX_SOURCE_POSITIONS = 64
IMAGE_GRID = 8
LAYERS = 2
MAX_LAYERS = 6
MIN_HEAD_DIM = 8
MAX_WIDTH_DIVISOR = 32
MAX_PARAMS = 300_000_000  # the milder shrinks keep widths: refuse models bigger than this


# --------------------------------------------------------------------------------------------
# Generic config shrinking (by attribute name only)
# --------------------------------------------------------------------------------------------

HIDDEN_KEYS = {"hidden_size", "d_model", "embed_dim", "n_embd", "hidden_dim", "dim", "embedding_dim", "emb_dim"}
HEADS_KEYS = {"num_attention_heads", "num_heads", "n_head", "n_heads", "attention_heads", "encoder_attention_heads",
              "decoder_attention_heads", "num_attention_heads_per_stage"}
STRUCT_WIDTH_EXACT = HIDDEN_KEYS | {"embedding_size", "d_kv", "d_head", "head_dim", "dim_head", "kv_lora_rank",
                                   "q_lora_rank", "rotary_dim", "word_embed_proj_dim", "proj_dim"}
STRUCT_WIDTH_SUFFIX = ("_hidden_size", "_head_dim", "_embed_dim", "_lora_rank", "_hidden_dim", "_proj_dim",
                       "_embedding_size", "_d_model", "hidden_sizes", "embed_dims", "_embed_dim_per_stage",
                       "embed_dim_per_stage", "hidden_size_global", "_d_head")
FREE_WIDTH_EXACT = {"intermediate_size", "ffn_dim", "d_ff", "n_inner", "mlp_dim", "projection_dim",
                    "projection_size", "shared_intermediate_size"}
FREE_WIDTH_SUFFIX = ("_intermediate_size", "_ffn_dim", "_projection_dim", "_mlp_dim", "_intermediate_dim")
WIDTH_EXCLUDE = ("vocab", "position", "max_", "num_", "token", "image", "patch", "window", "kernel", "mel",
                 "feature", "label", "class", "bucket", "codebook_size", "spatial", "temporal", "seq",
                 "stride", "sampling", "pool_scales", "conv")
LAYER_KEYS = {"num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers", "depth",
              "num_decoder_layers", "num_encoder_layers", "decoder_num_layers", "encoder_num_layers",
              "num_text_layers", "num_vision_layers", "text_layers", "vision_layers", "layers",
              "num_hidden_layers_text", "num_local_layers", "num_global_layers", "n_text_layer", "n_audio_layer"}
LAYER_LIST_KEYS = ("depths", "blocks_per_stage", "stage_num_blocks", "num_layers_per_stage")
LAYER_INDEX_WORDS = ("index", "indexes", "indices", "idx", "_layers", "layer_ids", "layer_id")
EXPERT_KEYS = {"num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "num_routed_experts",
               "n_experts", "num_experts_routed"}
TOPK_KEYS = {"num_experts_per_tok", "moe_k", "top_k", "moe_topk", "num_selected_experts", "num_experts_per_token",
             "moe_top_k", "router_top_k"}
GROUP_KEYS = {"n_group", "num_expert_group"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(x) for x in v)


def _width_kind(key: Any) -> str | None:
    if not isinstance(key, str) or key.lower().startswith("input"):  # input_dim: a feature size, not a width
        return None
    k = key.lower()
    if k in STRUCT_WIDTH_EXACT or k.endswith(STRUCT_WIDTH_SUFFIX):
        return None if any(w in k for w in WIDTH_EXCLUDE) and k not in STRUCT_WIDTH_EXACT else "struct"
    if k in FREE_WIDTH_EXACT or k.endswith(FREE_WIDTH_SUFFIX):
        return None if any(w in k for w in WIDTH_EXCLUDE) and k not in FREE_WIDTH_EXACT else "free"
    if k.endswith("_dim") and not any(w in k for w in WIDTH_EXCLUDE):
        return "soft"  # other widths: divided where they divide, else left alone
    return None


def _sub_dicts(d: dict):
    """The nested configs of a config dict (text_config, vision_config, encoder, decoder, backbone...)."""
    for key, value in d.items():
        if isinstance(value, dict) and key not in ("rope_parameters", "rope_scaling", "id2label", "label2id") and all(
            isinstance(k, str) for k in value
        ):
            if any(_is_int(v) or isinstance(v, dict) for v in value.values()):
                yield key, value
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "model_type" in v for v in value):
            for v in value:
                yield key, v


def _walk(d: dict):
    yield d
    for _, sub in _sub_dicts(d):
        yield from _walk(sub)


def _rope_dicts(d: dict):
    for key in ("rope_parameters", "rope_scaling"):
        value = d.get(key)
        if isinstance(value, dict):
            # Either one rope dict or one per layer type ({"full_attention": {...}, ...}).
            if any(isinstance(v, dict) for v in value.values()):
                yield from (v for v in value.values() if isinstance(v, dict))
            else:
                yield value


def _width_divisor(root: dict) -> int:
    """The largest power of two (<= MAX_WIDTH_DIVISOR) dividing every structural width of the tree
    while keeping each head dim >= MIN_HEAD_DIM and even."""
    values: list[int] = []
    head_dims: list[int] = []
    for d in _walk(root):
        for key, value in d.items():
            kind = _width_kind(key)
            if kind == "struct":
                vals = [value] if _is_int(value) else list(value) if _int_list(value) else []
                values += [v for v in vals if v > 1]
                if "head" in key or key in ("d_kv", "rotary_dim"):
                    head_dims += [v for v in vals if v > 1]
        heads = [d[k] for k in HEADS_KEYS if _is_int(d.get(k)) and d[k] > 0]
        heads += [d[k][0] for k in HEADS_KEYS if _int_list(d.get(k)) and d[k][0] > 0]  # per stage: the first
        hiddens = [d[k] for k in HIDDEN_KEYS if _is_int(d.get(k)) and d[k] > 0]
        explicit = any(isinstance(k, str) and ("head_dim" in k or k in ("d_kv", "d_head")) for k in d)
        for hidden in [] if explicit else hiddens:  # implicit head dim: hidden / heads
            for h in heads:
                if hidden % h == 0:
                    head_dims.append(hidden // h)
        for key in ("hidden_sizes", "embed_dims", "embed_dim_per_stage"):
            for hk in ("num_attention_heads", "num_heads", "num_attention_heads_per_stage"):
                if _int_list(d.get(key)) and _int_list(d.get(hk)) and len(d[key]) == len(d[hk]):
                    head_dims += [a // b for a, b in zip(d[key], d[hk]) if b and a % b == 0]
        for rope in _rope_dicts(d):
            if _int_list(rope.get("mrope_section")):
                values += [v for v in rope["mrope_section"] if v > 0]
        factor = d.get("partial_rotary_factor")
        for hd in head_dims:
            values += [hd, hd // 2 if hd % 2 == 0 else 1]
            if isinstance(factor, float) and 0 < factor < 1 and (hd * factor) % 2 == 0:
                values.append(int(hd * factor) // 2)
    if not values:
        return 1
    g = 0
    for v in values:
        g = math.gcd(g, v)
    divisor = 1
    while g % (divisor * 2) == 0 and divisor * 2 <= MAX_WIDTH_DIVISOR:
        divisor *= 2
    if head_dims:
        while divisor > 1 and min(head_dims) // divisor < min(MIN_HEAD_DIM, min(head_dims)):
            divisor //= 2
    return divisor


def _scale_widths(d: dict, divisor: int) -> None:
    if divisor == 1:
        return
    for key, value in list(d.items()):
        kind = _width_kind(key)
        if kind is None:
            continue
        if kind == "soft":
            if _is_int(value) and value > divisor and value % divisor == 0:
                d[key] = value // divisor
        elif _is_int(value) and value > 1:
            d[key] = value // divisor if kind == "struct" and value % divisor == 0 else max(1, round(value / divisor))
        elif _int_list(value):
            d[key] = [v // divisor if v % divisor == 0 else max(1, round(v / divisor)) for v in value]
    for rope in _rope_dicts(d):
        if _int_list(rope.get("mrope_section")):
            rope["mrope_section"] = [max(1, v // divisor) for v in rope["mrope_section"]]
        for key in ("short_factor", "long_factor"):  # one factor per rotary frequency (head_dim / 2)
            if isinstance(rope.get(key), list):
                rope[key] = rope[key][: max(1, len(rope[key]) // divisor)]


def _largest_divisor(n: int, at_most: int) -> int:
    return max(k for k in range(1, max(1, at_most) + 1) if n % k == 0)


def _fix_heads(d: dict) -> None:
    """Where a config without an explicit head_dim has heads that do not divide its width (some
    defaults are not buildable as they stand), use the largest head count that does."""
    if "head_dim" in d:
        return
    hiddens = [d[k] for k in HIDDEN_KEYS if _is_int(d.get(k)) and d[k] > 0]
    for hk in HEADS_KEYS:
        heads = d.get(hk)
        if _is_int(heads) and heads > 0 and hiddens and any(h % heads for h in hiddens):
            d[hk] = _largest_divisor(math.gcd(*hiddens), heads)
    heads = d.get("num_attention_heads")
    for kk in ("num_key_value_heads", "num_kv_heads", "n_kv_heads"):
        if _is_int(d.get(kk)) and _is_int(heads) and heads % d[kk]:
            d[kk] = _largest_divisor(heads, d[kk])


def _layer_keyed(v: Any, old: int) -> bool:
    """A dict keyed by layer index (e.g. per-layer config overrides)."""
    return isinstance(v, dict) and bool(v) and all(
        (_is_int(k) or isinstance(k, str) and k.isdigit()) and 0 <= int(k) < old for k in v)


def _all_layers(v: Any, old: int) -> bool:
    """A list of every layer index (e.g. ``moe_layers`` when every layer is MoE)."""
    return _int_list(v) and list(v) == list(range(old))


def _per_layer(v: Any, old: int) -> bool:
    """A list with one entry per layer (layer types, per-layer flags such as ``no_rope_layers``)."""
    return isinstance(v, (list, tuple)) and len(v) == old and old > 1 and not _all_layers(v, old)


def _layer_indices(d: dict, old: int, new: int) -> list[int]:
    """Which of the ``old`` layers to keep: one of each distinct per-layer setting, at least ``new``."""
    per_layer = [v for v in d.values() if _per_layer(v, old)]
    per_layer += [[v.get(i, v.get(str(i))) for i in range(old)] for k, v in d.items() if "layer" in k and _layer_keyed(v, old)]
    firsts: list[int] = []
    seconds: list[int] = []
    if per_layer:
        seen: collections.Counter = collections.Counter()
        for i in range(old):
            row = json.dumps([p[i] for p in per_layer], default=str, sort_keys=True)
            seen[row] += 1
            if seen[row] == 1:
                firsts.append(i)
            elif seen[row] == 2:
                seconds.append(i)
    # One layer of each kind first, then a second of each (so that a kind of attention that
    # alternates with other layers still gets a router), then the first layers.
    keep = firsts[:MAX_LAYERS]
    if len(firsts) > 1:
        keep += seconds[: MAX_LAYERS - len(keep)]
    for i in range(old):
        if len(keep) >= new:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _shrink_layers(d: dict) -> None:
    periodic = any(k.endswith("_period") and "layer" in k and _is_int(d[k]) and d[k] > 2 for k in d)
    for key in [k for k in d if k in LAYER_KEYS and _is_int(d[k]) and d[k] > LAYERS]:
        old = d[key]
        keep = _layer_indices(d, old, min(old, 2 * LAYERS) if periodic else LAYERS)
        d[key] = len(keep)
        for k, v in list(d.items()):
            if _all_layers(v, old):
                d[k] = list(range(len(keep)))
            elif _per_layer(v, old):
                d[k] = [v[i] for i in keep]
            elif "layer" in k and _layer_keyed(v, old):
                d[k] = {type(kk)(keep.index(int(kk))): vv for kk, vv in v.items() if int(kk) in keep}
            elif k == "out_indices" and _int_list(v) and all(0 <= x <= old for x in v):
                # Backbone outputs index stage_names = ["stem", layer 1, ..., layer N].
                near = lambda x: 1 + min(range(len(keep)), key=lambda n: abs(keep[n] - (x - 1)))  # noqa: E731
                d[k] = sorted({0 if x == 0 else near(x) for x in v})
            elif _int_list(v) and any(w in k.lower() for w in LAYER_INDEX_WORDS) and all(0 <= x < old for x in v):
                # Layer indices (global attention layers, deepstack taps...): nearest kept layer.
                mapped: list[int] = []
                for x in v:
                    j = min(range(len(keep)), key=lambda n: abs(keep[n] - x))
                    if j not in mapped:
                        mapped.append(j)
                d[k] = mapped
        if "out_indices" in d and d.get("out_features") is not None:
            d["out_features"] = None  # recomputed from out_indices
    # Layer patterns given as period and offset (attention every 8th layer from the 4th...):
    # every 2nd layer, in 4 layers, so that each kind has 2 layers.
    for key in [k for k in d if k.endswith("_period") and "layer" in k and _is_int(d[k]) and d[k] > 2]:
        d[key] = 2
        offset = key[: -len("_period")] + "_offset"
        if _is_int(d.get(offset)):
            d[offset] = d[offset] % 2
    for key in LAYER_LIST_KEYS:
        if _int_list(d.get(key)):
            d[key] = [min(v, LAYERS) for v in d[key]]


def _shrink_experts(d: dict) -> None:
    topk = max([d[k] for k in TOPK_KEYS if _is_int(d.get(k))] or [1])
    groups = max([d[k] for k in GROUP_KEYS if _is_int(d.get(k))] or [1])
    for key in EXPERT_KEYS:
        value = d.get(key)
        if _is_int(value) and value > 8:
            new = min(value, max(8, 2 * topk))
            new = -(-new // groups) * groups
            if value % new == 0 or value >= new:
                d[key] = new


class _Ids:
    """Special token ids >= the tiny vocabulary, remapped consistently across the config tree."""

    def __init__(self, used: set[int]):
        self.map: dict[int, int] = {}
        self.free = [i for i in range(TINY_VOCAB - 1, TINY_VOCAB // 2, -1) if i not in used]

    def __call__(self, v: int) -> int:
        if v < TINY_VOCAB:
            return v
        if v not in self.map:
            self.map[v] = self.free.pop(0) if self.free else TINY_VOCAB - 1
        return self.map[v]


def _token_key(key: str) -> bool:
    k = key.lower()
    return "token" in k and k.endswith(("_id", "_ids", "_index", "_indices", "token_id", "tokens"))


def _shrink_vocab(root: dict) -> None:
    used = set()
    for d in _walk(root):
        for k, v in d.items():
            if _token_key(k):
                used |= {v} if _is_int(v) else set(v) if _int_list(v) else set()
    ids = _Ids(used)
    for d in _walk(root):
        for k, v in list(d.items()):
            kl = k.lower()
            if "vocab_size" in kl and kl != "type_vocab_size" and _is_int(v) and v > TINY_VOCAB:
                d[k] = TINY_VOCAB
            elif _token_key(k):
                if _is_int(v) and v >= 0:
                    d[k] = ids(v)
                elif _int_list(v):
                    d[k] = [ids(x) if x >= 0 else x for x in v]


def _shrink_positions(d: dict) -> None:
    for k, v in list(d.items()):
        if not _is_int(v) or not isinstance(k, str):
            continue
        kl = k.lower()
        if kl in ("max_source_positions",) and v > MAX_SOURCE_POSITIONS:
            d[k] = MAX_SOURCE_POSITIONS
        elif (kl.endswith("max_position_embeddings") or kl in ("n_positions", "n_ctx", "max_target_positions")) and v > MAX_POSITIONS:
            d[k] = MAX_POSITIONS


def _shrink_images(root: dict) -> None:
    grids: dict[int, int] = {}
    for d in _walk(root):
        size, patch = d.get("image_size"), d.get("patch_size")
        size_i = size[0] if _int_list(size) else size
        patch_i = patch[0] if _int_list(patch) else patch
        if _is_int(size_i) and _is_int(patch_i) and patch_i > 0 and size_i % patch_i == 0 and size_i // patch_i > IMAGE_GRID:
            old = size_i // patch_i
            new_size = patch_i * IMAGE_GRID
            d["image_size"] = [new_size] * len(size) if _int_list(size) else new_size
            grids[old] = IMAGE_GRID
    if not grids:
        return
    # Token counts per image that follow the grid (num_image_tokens, image_seq_length...).
    counts = {}
    for old, new in grids.items():
        for m in (1, 2, 4):
            if old % m == 0:
                counts[(old // m) ** 2] = (new // m) ** 2
                counts[(old // m) ** 2 + 1] = (new // m) ** 2 + 1  # with a class token
    for d in _walk(root):
        for k, v in list(d.items()):
            kl = k.lower()
            if _is_int(v) and v in counts and ("token" in kl or "seq_length" in kl or "num_patches" in kl
                                                or kl == "num_position_embeddings" or "tokens_per_image" in kl):
                d[k] = counts[v]


def _fix_init(d: dict) -> None:
    """Some defaults initialise weights with std 1e-10 (BLIP's vision tower): K/V are then ~1e-10
    and no router perturbation can show in float32 outputs. Use a usual std instead."""
    for k in ("initializer_range", "init_std", "initializer_factor"):
        if isinstance(d.get(k), float) and 0 < d[k] < 1e-4:
            d[k] = 0.02


def shrink_config_dict(d: dict, level: int) -> dict:
    """A tiny version of a config's ``to_dict()``: level 0 shrinks everything, level 1 keeps the
    vocabulary, positions and image sizes, level 2 only cuts layers and experts."""
    d = copy.deepcopy(d)
    if level <= 1:
        divisor = _width_divisor(d)
        for sub in _walk(d):
            _scale_widths(sub, divisor)
    for sub in _walk(d):
        _shrink_layers(sub)
        _shrink_experts(sub)
        _fix_heads(sub)
        _fix_init(sub)
        if level == 0:
            _shrink_positions(sub)
    if level == 0:
        _shrink_vocab(d)
        _shrink_images(d)
    return d


def _set_path(d: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for p in parents:
        d = d[p]
    d[last] = value


# --------------------------------------------------------------------------------------------
# Choosing the class
# --------------------------------------------------------------------------------------------


def model_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def choose_class(model_type: str) -> tuple[str | None, str, str | None]:
    """(class name, which mapping gave it, its auto class), or (None, reason, None).

    The first of ``HEAD_MAPPINGS`` that has the type, except where that head would use only
    part of the model: an encoder-decoder's causal LM class (its decoder alone) gives way to
    its seq2seq class, an encoder's causal LM class (its ``is_decoder`` mode) to its masked
    LM class, a multimodal model's causal LM class (its text model) to its image-text-to-text
    or multimodal LM class, and a dual tower's image classifier (its vision tower alone) to its
    base model.
    """
    from transformers.models.auto import modeling_auto

    def has(mapping: str) -> bool:
        return model_type in getattr(modeling_auto, mapping, {})

    skip = set()
    if has("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES") and (
        has("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES") or has("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES")
        or has("MODEL_FOR_MASKED_LM_MAPPING_NAMES") or has("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")
        or has("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES")
    ):
        skip.add("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    if has("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES") and has("MODEL_MAPPING_NAMES"):
        try:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            subs = [k for k, v in vars(CONFIG_MAPPING[model_type]()).items() if k.endswith("_config") and hasattr(v, "to_dict")]
        except Exception:
            subs = []
        if len(subs) >= 2:
            skip.add("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES")
    for mapping, label, auto in HEAD_MAPPINGS:
        names = getattr(modeling_auto, mapping, {})
        if model_type in names and mapping not in skip:
            name = names[model_type]
            return (name[0] if isinstance(name, (list, tuple)) else name), label, auto
    return None, "no auto mapping", None


def _class_by_config(model_type: str):
    """For a sub-model type with no auto mapping: the model class whose config_class is its config."""
    import importlib
    import inspect

    from transformers import PreTrainedModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name

    cfg_cls = CONFIG_MAPPING[model_type]
    module_name = model_type_to_module_name(model_type)
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    cands = [c for n, c in vars(module).items() if inspect.isclass(c) and issubclass(c, PreTrainedModel)
             and getattr(c, "config_class", None) is cfg_cls and not n.endswith("PreTrainedModel")]
    if not cands:
        return None
    order = ("ForCausalLM", "ForConditionalGeneration", "ForMaskedLM", "ForImageClassification", "Model")
    return min(cands, key=lambda c: next((i for i, s in enumerate(order) if c.__name__.endswith(s)), len(order)))


# --------------------------------------------------------------------------------------------
# Checking one type (runs in a worker process)
# --------------------------------------------------------------------------------------------


class TypeTimeout(BaseException):
    """The per-type time limit ran out (a BaseException so that model code's ``except Exception`` cannot swallow it)."""


def _on_alarm(signum, frame):
    raise TypeTimeout()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    line = lines[0] if lines else ""
    if line.endswith(":") and len(lines) > 1:  # "Class validation error for validator ...:" says nothing alone
        line = f"{line} {lines[1]}"
    return f"{type(exc).__name__}: {line[:300]}" if line else type(exc).__name__


def _flatten(out: Any, prefix: str = "") -> list[tuple[str, Any]]:
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix or "out", out)] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, dict) or hasattr(out, "keys") and hasattr(out, "__getitem__") and not isinstance(out, (str, bytes)):
        items = []
        for k in list(out.keys()):
            items += _flatten(out[k], f"{prefix}.{k}" if prefix else str(k))
        return items
    if isinstance(out, (list, tuple)):
        items = []
        for i, v in enumerate(out):
            items += _flatten(v, f"{prefix}[{i}]")
        return items
    return []


def _same(a, b) -> bool:
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    both_nan = torch.isnan(a) & torch.isnan(b) if a.is_floating_point() else torch.zeros_like(a, dtype=torch.bool)
    return bool(((a == b) | both_nan).all())


def _forward(model, args, kwargs):
    import torch

    torch.manual_seed(0)  # models that draw noise in forward (random masking) see the same noise
    with torch.no_grad():
        return model(*args, **copy.copy(kwargs))


def _sequences(out):
    return out if not hasattr(out, "sequences") else out.sequences


def _same_generation(a, b) -> bool:
    import torch

    a, b = _sequences(a), _sequences(b)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


def _score_diff(a, b) -> float:
    """Largest difference of the per-step scores of two greedy generations (inf if not comparable)."""
    sa, sb = getattr(a, "scores", None), getattr(b, "scores", None)
    if not sa or not sb or len(sa) != len(sb) or any(x.shape != y.shape for x, y in zip(sa, sb)):
        return float("inf") if sa or sb else 0.0
    return max(float((x.float() - y.float()).abs().nan_to_num(0.0).max()) for x, y in zip(sa, sb))


def _has_attention_modules(model) -> bool:
    import torch

    pat = re.compile(r"attention|attn", re.I)
    return any(pat.search(type(m).__name__) or isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())


def _stack_label(site) -> str:
    if site.stack:
        return site.stack
    return re.sub(r"\.\d+(?=\.|$)", ".*", site.attention)


def _instantiate(cls, auto: str | None, config):
    import transformers

    auto_cls = getattr(transformers, auto, None) if auto else None
    if auto_cls is not None:
        try:
            return auto_cls.from_config(config)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
    return cls._from_config(config)


def _build(model_type: str, cls, level: int, auto: str | None = None):
    """Config and model at one shrink level, and the base model's inputs and outputs."""
    import torch
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from limeify.discovery import default_example_inputs

    cfg_cls = CONFIG_MAPPING[model_type]
    try:
        base = cfg_cls().to_dict()
    except Exception as exc:
        raise _Stage("default config", exc) from exc
    for drop in ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        base.pop(drop, None)
    d = shrink_config_dict(base, level)
    for path, value in OVERRIDES.get(model_type, {}).items():
        _set_path(d, path, value)
    try:
        config = cfg_cls.from_dict(d)
    except Exception as exc:
        raise _Stage("config", exc) from exc
    if level == 2:
        try:
            with torch.device("meta"):
                meta = _instantiate(cls, auto, config)
            n = sum(p.numel() for p in meta.parameters())
            del meta
        except Exception:
            n = 0
        if n > MAX_PARAMS:
            raise _Stage("build", RuntimeError(f"too big to build on CPU with widths kept ({n / 1e6:.0f}M parameters)"))
    try:
        torch.manual_seed(0)
        model = _instantiate(cls, auto, config)
        model = model.float().eval()
    except Exception as exc:
        raise _Stage("build", exc) from exc
    try:
        args, kwargs = default_example_inputs(model)
    except Exception as exc:
        raise _Stage("inputs", exc, _has_attention_modules(model)) from exc
    import inspect

    params = inspect.signature(model.forward).parameters
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if "use_cache" in params or (any(p.kind is p.VAR_KEYWORD for p in params.values()) and hasattr(text, "use_cache")):
        kwargs.setdefault("use_cache", False)  # as discovery does: a KV cache is no output to compare
    try:
        out = _forward(model, args, kwargs)
    except Exception as exc:
        raise _Stage("base forward", exc, _has_attention_modules(model)) from exc
    return config, model, args, kwargs, out


class _Stage(Exception):
    def __init__(self, stage: str, exc: BaseException, has_attention: bool | None = None):
        super().__init__(stage)
        self.stage, self.exc, self.has_attention = stage, exc, has_attention


def _too_big(error: str) -> bool:
    return "too big" in error or "can't allocate memory" in error or error.startswith("MemoryError")


def check_type(model_type: str, time_limit: int) -> dict:
    import torch
    import transformers

    import limeify

    result: dict = {"type": model_type, "class": None, "source": None, "status": "not built", "stage": None,
                    "error": None, "stacks": [], "sites": None, "identity": None, "routers": None,
                    "generate": None, "level": None, "seconds": None, "attempts": []}
    start = time.time()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(time_limit)
    try:
        if model_type in SKIP:
            result["error"] = SKIP[model_type]
            result["stage"] = "skipped"
            return result
        name, source, auto = choose_class(model_type)
        try:
            if name is None:
                cls = _class_by_config(model_type)
                if cls is None:
                    result.update(stage="class", error="no model class (no auto mapping, none with this config_class)")
                    return result
                name, source = cls.__name__, "config_class (no auto mapping)"
            else:
                cls = getattr(transformers, name)
        except Exception as exc:
            result.update(**{"class": name, "source": source}, stage="import", error=first_line(exc))
            return result
        result["class"], result["source"] = name, source

        built = None
        for level in (0, 1, 2):
            result["step"] = f"build (level {level})"
            try:
                built = _build(model_type, cls, level, auto)
                result["level"] = level
                break
            except _Stage as err:
                result["attempts"].append({"level": level, "stage": err.stage, "error": first_line(err.exc),
                                           "has_attention": err.has_attention})
                if err.stage == "default config":
                    break
        if built is None:
            real = [a for a in result["attempts"] if not _too_big(a["error"])]
            last = real[-1] if real else result["attempts"][-1]
            result["stage"], result["error"] = last["stage"], last["error"]
            if not real:
                result["error"] = f"too big to build on CPU ({last['error']})"
            if last["stage"] in ("inputs", "base forward"):
                # Built, but limeify's default inputs cannot be built or do not run it.
                result["has_attention"] = bool(last["has_attention"])
                result["status"] = "inputs" if last["has_attention"] else "no attention"
            return result
        config, base, args, kwargs, base_out = built
        result["class"] = type(base).__name__  # what the auto class built
        has_attention = _has_attention_modules(base)
        result["has_attention"] = has_attention

        result["step"] = "copy"
        lime = copy.deepcopy(base)
        result["step"] = "limeify"
        try:
            limeify.limeify(lime)
        except Exception as exc:
            msg = first_line(exc)
            if "found no attention" in msg and not has_attention:
                result.update(status="no attention", stage="limeify", error=msg)
            else:
                result.update(status="fail", stage="limeify", error=msg)
            return result
        sites = limeify.attention_sites(lime)
        stacks = collections.Counter(_stack_label(s) for s in sites)
        result["stacks"] = [[k, v] for k, v in stacks.items()]
        result["sites"] = len(sites)
        result["routers_count"] = len(limeify.routers(lime))

        failures = []
        # (1) identity
        result["step"] = "identity"
        try:
            lime_out = _forward(lime, args, kwargs)
            a, b = _flatten(base_out), _flatten(lime_out)
            if [k for k, _ in a] != [k for k, _ in b]:
                result["identity"] = False
                failures.append(("identity", f"output structure differs ({len(a)} vs {len(b)} tensors)"))
            else:
                bad = [k for (k, x), (_, y) in zip(a, b) if not _same(x, y)]
                result["identity"] = not bad and bool(a)
                if bad:
                    k = bad[0]
                    x, y = dict(a)[k], dict(b)[k]
                    diff = (x - y).abs().max().item() if x.shape == y.shape else float("nan")
                    failures.append(("identity", f"{len(bad)} of {len(a)} outputs differ ({k}: max abs diff {diff:.3g})"))
                elif not a:
                    failures.append(("identity", "no floating outputs to compare"))
        except Exception as exc:
            result["identity"] = False
            failures.append(("identity", first_line(exc)))

        # (2) routers active
        result["step"] = "routers"
        params = limeify.router_parameters(lime)
        if not params:
            result["routers"] = None
        else:
            try:
                gen = torch.Generator().manual_seed(1)
                with torch.no_grad():
                    for p in params:
                        p.add_(torch.randn(p.shape, generator=gen).to(p) * 0.3)
                pert_out = _forward(lime, args, kwargs)
                main_base = _flatten(base_out)[0][1]
                main_pert = _flatten(pert_out)[0][1]
                changed = not _same(main_base, main_pert)
                result["routers"] = changed
                if not changed:
                    failures.append(("routers", f"main output {_flatten(base_out)[0][0]} unchanged by perturbed routers"))
            except Exception as exc:
                result["routers"] = False
                failures.append(("routers", first_line(exc)))

        # (3) cached generate equals uncached generate (perturbed routers)
        can_generate = getattr(base, "can_generate", lambda: False)()
        if can_generate:
            result["step"] = "generate"
            g = {k: v for k, v in kwargs.items() if k not in ("decoder_input_ids", "use_cache")}
            opts = dict(max_new_tokens=3, do_sample=False, num_beams=1, output_scores=True, return_dict_in_generate=True)
            for m in (base, lime):  # default configs of some encoder-decoders name no start token
                gc_ = getattr(m, "generation_config", None)
                if gc_ is not None and getattr(config, "is_encoder_decoder", False) and gc_.decoder_start_token_id is None:
                    # bos rather than pad: models that mask pad ids would mask the start token
                    start_id = next((t for t in (gc_.bos_token_id, gc_.pad_token_id) if isinstance(t, int)), 0)
                    gc_.decoder_start_token_id = start_id
            base_differs = False
            try:
                with torch.no_grad():
                    b1 = base.generate(*args, **g, **opts, use_cache=True)
                    b2 = base.generate(*args, **g, **opts, use_cache=False)
                base_differs = not _same_generation(b1, b2) or _score_diff(b1, b2) > 1e-4
            except Exception as exc:
                result["generate"] = "n/a"
                result["generate_note"] = f"base model's generate fails: {first_line(exc)}"
            if base_differs:
                result["generate"] = "n/a"
                result["generate_note"] = "the base model's own cached and uncached greedy generate differ"
            elif result["generate"] is None:
                try:
                    with torch.no_grad():
                        cached = lime.generate(*args, **g, **opts, use_cache=True)
                        uncached = lime.generate(*args, **g, **opts, use_cache=False)
                    same = _same_generation(cached, uncached)
                    result["generate"] = bool(same)
                    result["generate_score_diff"] = _score_diff(cached, uncached)
                    if not same:
                        failures.append(("generate", f"cached {_sequences(cached).tolist()} != uncached {_sequences(uncached).tolist()}"))
                except Exception as exc:
                    result["generate"] = False
                    failures.append(("generate", first_line(exc)))
        if failures:
            result.update(status="fail", stage=failures[0][0], error=failures[0][1])
            result["failures"] = [list(f) for f in failures]
        else:
            result["status"] = "pass"
        return result
    except TypeTimeout:
        if result.get("level") is None:
            result.update(status="timeout", stage="build", error=f"TimeoutError: over the {time_limit} s limit")
        else:
            result.update(status="fail", stage=result.get("step"), error=f"TimeoutError: over the {time_limit} s limit")
        return result
    except BaseException as exc:  # noqa: BLE001: anything at all, so the sweep goes on
        step = str(result.get("step"))
        if _too_big(first_line(exc)) and (step in ("copy", "None") or step.startswith("build")):
            # Out of memory while the harness built or copied the model: not a limeify result.
            result.update(status="not built", stage="build", error=f"too big to build on CPU ({first_line(exc)})")
            return result
        result.update(status="fail" if result.get("level") is not None else "not built", stage=result.get("stage") or "harness",
                      error=first_line(exc), traceback=traceback.format_exc()[-2000:])
        return result
    finally:
        signal.alarm(0)
        result["seconds"] = round(time.time() - start, 2)


# --------------------------------------------------------------------------------------------
# Worker pool: one process per worker, a hard kill behind the alarm
# --------------------------------------------------------------------------------------------


def _worker(conn, time_limit: int, mem_gb: float, quiet: bool) -> None:
    if quiet:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    if mem_gb:
        limit = int(mem_gb * 2**30)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            pass
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    import transformers

    transformers.logging.set_verbosity_error()
    import limeify  # noqa: F401

    conn.send(("ready", None))
    while True:
        try:
            model_type = conn.recv()
        except EOFError:
            return
        if model_type is None:
            return
        result = check_type(model_type, time_limit)
        import gc

        gc.collect()
        conn.send(("result", result))


class Pool:
    def __init__(self, jobs: int, time_limit: int, mem_gb: float, quiet: bool):
        self.ctx = mp.get_context("spawn")
        self.time_limit, self.mem_gb, self.quiet = time_limit, mem_gb, quiet
        self.workers = [self._spawn() for _ in range(jobs)]

    def _spawn(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, self.time_limit, self.mem_gb, self.quiet), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "task": None, "since": None, "ready": False}

    def run(self, types: list[str], on_result) -> None:
        pending = list(types)
        hard = self.time_limit + 60
        while pending or any(w["task"] for w in self.workers):
            for i, w in enumerate(self.workers):
                if w["task"] is None and w["ready"] and pending:
                    w["task"], w["since"] = pending.pop(0), time.time()
                    w["conn"].send(w["task"])
            ready = mp.connection.wait([w["conn"] for w in self.workers] + [w["proc"].sentinel for w in self.workers], timeout=5)
            for i, w in enumerate(self.workers):
                if w["conn"] in ready:
                    try:
                        kind, payload = w["conn"].recv()
                    except (EOFError, OSError):
                        kind, payload = "dead", None
                    if kind == "ready":
                        w["ready"] = True
                        continue
                    if kind == "result":
                        w["task"] = None
                        on_result(payload)
                        continue
                dead = not w["proc"].is_alive()
                late = w["task"] is not None and time.time() - w["since"] > hard
                if dead or late:
                    task = w["task"]
                    if late and not dead:
                        w["proc"].kill()
                    w["proc"].join(5)
                    code = w["proc"].exitcode
                    if task is not None:
                        on_result({"type": task, "status": "fail" if late else "crash", "stage": "worker",
                                   "error": (f"killed after {hard} s (the alarm did not interrupt it)" if late
                                             else f"worker process died (exit code {code}; out of memory?)"),
                                   "stacks": [], "sites": None, "identity": None, "routers": None, "generate": None,
                                   "class": None, "seconds": round(time.time() - w["since"], 1)})
                    self.workers[i] = self._spawn()

    def close(self) -> None:
        for w in self.workers:
            try:
                w["conn"].send(None)
            except (BrokenPipeError, OSError):
                pass
        for w in self.workers:
            w["proc"].join(10)
            if w["proc"].is_alive():
                w["proc"].kill()


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

COUNTED = ("pass", "fail", "inputs", "crash")


def normalize(error: str) -> str:
    """A message prefix for grouping: names, quoted text and numbers replaced."""
    msg = error or ""
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "'…'", msg)
    msg = re.sub(r"\b[A-Z][A-Za-z0-9]*(?:Model|LM|Generation|Classification|Encoder|Decoder|Transformer|Tower|Attention|Layer|Block|Config)\w*\b", "<Class>", msg)
    msg = re.sub(r"\b[\w]+(?:\.[\w*]+){2,}\b", "<path>", msg)
    msg = re.sub(r"\[[^\]]*\]", "[…]", msg)
    msg = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", msg)
    msg = re.sub(r"\s+", " ", msg).strip()
    return msg[:110]


def _yn(v) -> str:
    return {True: "yes", False: "**no**", None: "–", "n/a": "n/a"}.get(v, str(v))


def _cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _git_commit() -> str:
    """The checkout's commit (and whether limeify/ had local changes), read-only."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "limeify"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return f"commit {head}" + (" with local changes to limeify/" if dirty else "") if head else "unknown commit"
    except Exception:
        return "unknown commit"


def render(results: list[dict], command: str, elapsed: float) -> str:
    import torch
    import transformers

    results = sorted(results, key=lambda r: r["type"].lower())
    counts = collections.Counter(r["status"] for r in results)
    counted = [r for r in results if r["status"] in COUNTED or (r["status"] == "timeout" and r.get("has_attention"))]
    passed = sum(r["status"] == "pass" for r in results)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    commit = _git_commit()
    lines = [
        "# Architecture coverage",
        "",
        f"Produced by `{command}` on {now} ({sum(r.get('seconds') or 0 for r in results) / 60:.0f} min of per-type "
        f"time in all; transformers {transformers.__version__}, "
        f"torch {torch.__version__}, Python {platform.python_version()}, CPU; limeify {commit}). "
        "Do not edit by hand: rerun the script.",
        "",
        f"**{passed} of {len(counted)} buildable types with attention pass** (of {len(results)} model types: "
        + ", ".join(f"{counts[s]} {s}" for s in ("pass", "fail", "inputs", "no attention", "not built", "timeout", "crash") if counts[s])
        + ").",
        "",
        "Each type is built with random weights from a tiny version of its config's defaults (shrunk by "
        "attribute name: widths divided by one power of two, 2 layers, small vocabulary and images), "
        "limeified with default settings on the inputs limeify builds from the config, and checked:",
        "",
        "* **identity**: every floating output of the limeified model (identity init) equals the base model's exactly;",
        "* **routers active**: after adding noise (std 0.3) to every router parameter the main output (first floating output) changes;",
        "* **cached generate**: for models that can `generate`, greedy decoding of 3 tokens (perturbed routers) gives the same "
        "tokens with and without the KV cache (n/a: the base model's own `generate` fails on these inputs).",
        "",
        "Status: `pass` (every check that applies passed); `fail` (limeify raised, or a check failed); `inputs` (the model "
        "was built but limeify's default example inputs could not be built or do not run it: such a model needs "
        "`example_inputs=`); `no attention` (limeify found none and the model has no attention-like module); `not built` "
        "(the harness could not build a tiny CPU model: reason given); `timeout`. Class: the head the script picked "
        "(causal LM > seq2seq LM > image-text-to-text > masked LM > image classification > base model, except that "
        "an encoder-decoder's seq2seq class, an encoder's masked LM class and a dual tower's base model win over heads "
        "that use only part of the model; sub-model types without an auto mapping use the class whose `config_class` "
        "is theirs). Identity, routers active, cached generate: – where the check does not apply (no routers, no `generate`). Level: how far the config was shrunk "
        "(0 everything, 1 vocabulary/positions/images kept, 2 only layers and experts cut).",
        "",
        "| type | class | stacks (layers) | sites | identity | routers active | cached generate | result / error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        stacks = "<br>".join(f"`{name}` ({n})" for name, n in r.get("stacks") or [])
        if r["status"] == "pass":
            res = "pass" + (f" (level {r['level']})" if r.get("level") else "")
        else:
            res = f"**{r['status']}**" + (f" [{r['stage']}]" if r.get("stage") else "") + (f": {r['error']}" if r.get("error") else "")
        gen = _yn(r.get("generate"))
        cls = r.get("class") or ""
        lines.append(f"| {r['type']} | {_cell(cls)} | {stacks} | {r.get('sites') or ''} | {_yn(r.get('identity'))} | "
                     f"{_yn(r.get('routers'))} | {gen} | {_cell(res)} |")
    lines += ["", "## Failure categories", "",
              "Failures of built types with attention (`fail`, `inputs`, `crash`, timeouts), grouped by the check or step "
              "that failed, the exception type and a normalized message prefix.", "",
              "| count | step | error (normalized) | example types |", "|---|---|---|---|"]
    lines += _categories([r for r in counted if r["status"] != "pass"])
    lines += ["", "## Not built", "", "Why the harness could not build a tiny model (not a limeify result).", "",
              "| count | step | reason (normalized) | example types |", "|---|---|---|---|"]
    lines += _categories([r for r in results if r["status"] in ("not built",) or (r["status"] == "timeout" and not r.get("has_attention"))])
    nothing = [r["type"] for r in results if r["status"] == "no attention"]
    if nothing:
        lines += ["", "## No attention", "", f"{len(nothing)} types: " + ", ".join(nothing) + "."]
    return "\n".join(lines) + "\n"


def categories(results: list[dict]) -> list[tuple[int, str, str, list[str]]]:
    groups: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for r in results:
        groups[(r.get("stage") or "", normalize(r.get("error") or r["status"]))].append(r["type"])
    rows = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return [(len(types), stage, msg, types) for (stage, msg), types in rows]


def _categories(results: list[dict]) -> list[str]:
    out = []
    for n, stage, msg, types in categories(results):
        ex = ", ".join(types[:6]) + (", …" if len(types) > 6 else "")
        out.append(f"| {n} | {stage} | {_cell(msg)} | {ex} |")
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_TYPES)}")
    parser.add_argument("--types", help="comma-separated model types to run")
    parser.add_argument("--out", help=f"markdown path ('-' for stdout); default {DEFAULT_OUT.relative_to(ROOT)} for a full "
                        "run, a temporary file with --quick/--types")
    parser.add_argument("--jsonl", help="also append one JSON line per type here; with --resume, skip types already in it")
    parser.add_argument("--resume", action="store_true", help="reuse the results already in --jsonl")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--time-limit", type=int, default=60, help="seconds per type (default 60)")
    parser.add_argument("--mem-gb", type=float, default=8.0, help="address-space limit per worker in GiB (0: none)")
    parser.add_argument("--verbose", action="store_true", help="keep the workers' stderr (warnings, tracebacks)")
    args = parser.parse_args(argv)

    all_types = model_types()
    if args.types:
        types = [t.strip() for t in args.types.split(",") if t.strip()]
        unknown = [t for t in types if t not in all_types]
        if unknown:
            parser.error(f"unknown model types: {', '.join(unknown)}")
    elif args.quick:
        types = list(QUICK_TYPES)
    else:
        types = all_types
    full = not (args.types or args.quick)
    out = args.out or (str(DEFAULT_OUT) if full else os.path.join(tempfile.gettempdir(), "limeify-coverage.md"))

    done: dict[str, dict] = {}
    if args.resume and args.jsonl and os.path.exists(args.jsonl):
        with open(args.jsonl) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[r["type"]] = r
    todo = [t for t in types if t not in done]
    results = [done[t] for t in types if t in done]
    jsonl = open(args.jsonl, "a") if args.jsonl else None
    start = time.time()
    total = len(types)
    print(f"coverage: {len(todo)} types to run ({len(results)} reused), {args.jobs} worker(s), {args.time_limit} s each",
          flush=True)

    def on_result(r: dict) -> None:
        results.append(r)
        if jsonl:
            jsonl.write(json.dumps(r, default=str) + "\n")
            jsonl.flush()
        stacks = ", ".join(f"{n}x{c}" for n, c in (r.get("stacks") or []))
        detail = "" if r["status"] == "pass" else f" [{r.get('stage')}] {(r.get('error') or '')[:150]}"
        print(f"[{len(results):4d}/{total}] {r['type']:<32} {r.get('class') or '-':<45} {r['status']:<12} "
              f"{r.get('seconds') or 0:5.1f}s {stacks[:80]}{detail}", flush=True)

    pool = Pool(max(1, args.jobs), args.time_limit, args.mem_gb, quiet=not args.verbose)

    def on_term(signum, frame):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_term)
    try:
        pool.run(todo, on_result)
    except KeyboardInterrupt:
        print("interrupted: writing the table for the types done", flush=True)
    finally:
        pool.close()
        if jsonl:
            jsonl.close()
    elapsed = time.time() - start
    shown, skip = [], False
    for a in argv if argv is not None else sys.argv[1:]:  # the scratch file is no part of the recipe
        if skip or a == "--resume" or a.startswith("--jsonl"):
            skip = a == "--jsonl"
            continue
        shown.append(a)
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if os.environ.get("OMP_NUM_THREADS") else ""
    argv_text = " ".join([f"{threads}python benchmarks/coverage.py"] + shown)
    text = render(results, argv_text, elapsed)
    if out == "-":
        print(text)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    counted = [r for r in results if r["status"] in COUNTED]
    passed = sum(r["status"] == "pass" for r in results)
    print(f"coverage: {passed} of {len(counted)} buildable types with attention pass "
          f"({len(results)} types, {elapsed:.0f} s); table: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
