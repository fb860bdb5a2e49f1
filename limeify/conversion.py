"""Converting pretrained checkpoints into limeified ones, and loading them back."""

from __future__ import annotations

import json
import os
import signal
import warnings
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .config import LimeConfig
from .discovery import default_example_inputs, discover_sites
from .errors import LimeError
from .injection import lime_state, limeify, router_prefix, routers, unlimeify
from .files import staged_directory
from .persistence import CONFIG_NAME, load_lime, write_lime
from .routers import MECHANISMS, ROUTER_ATTR
from .sites import shared_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _model_class(config) -> type:
    import transformers
    from transformers.models.auto import modeling_auto

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    # No architecture recorded (e.g. a GGUF file): the head transformers' own auto tables pair with the type.
    if config.model_type in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForSeq2SeqLM
    if getattr(config, "is_decoder", False) or config.model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _source(src: str | os.PathLike) -> tuple[Path, dict]:
    src = Path(src)
    if src.is_file() and src.suffix == ".gguf":
        return src.parent, {"gguf_file": src.name}
    if src.is_dir() and (src / "config.json").is_file():
        return src, {}
    raise LimeError(f"{src} is neither a transformers checkpoint directory (with config.json) nor a .gguf file")


def load_pretrained_base(src: str | os.PathLike, dtype: str = "float32") -> nn.Module:
    """Load a transformers checkpoint directory or GGUF file (no network access)."""
    from transformers import AutoConfig

    directory, extra = _source(src)
    if dtype not in DTYPES:
        raise LimeError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    config = AutoConfig.from_pretrained(directory, local_files_only=True, **extra)
    cls = _model_class(config)
    # config= spares from_pretrained a second parse of the file (seconds for a GGUF).
    model = cls.from_pretrained(directory, config=config, dtype=DTYPES[dtype], local_files_only=True, **extra).eval()
    if extra:
        # transformers dequantizes GGUF tensors on load; the leftover quantizer marker only
        # blocks save_pretrained of what are plain float weights now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def _probe_logits(model: nn.Module, inputs) -> torch.Tensor:
    args, kwargs = inputs
    with torch.no_grad():
        out = model(*args, **kwargs)
    out = out if isinstance(out, torch.Tensor) else (out.logits if getattr(out, "logits", None) is not None else out[0])
    return out.float()


def saved_router_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Router tensors in a checkpoint's own weights (``model.save_pretrained`` of a limeified model)."""
    from safetensors import safe_open

    directory = Path(path)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else (
        ["model.safetensors"] if (directory / "model.safetensors").is_file() else [])
    found = {}
    for name in files:
        with safe_open(str(directory / name), "pt") as f:
            for key in f.keys():
                if f".{ROUTER_ATTR}." in key:
                    found[key] = f.get_tensor(key)
    return found


def _write(model: nn.Module, directory: Path, src=None) -> None:
    """Base weights (no routers), the router adapter and ``src``'s tokenizer."""
    base_state = {k: v for k, v in model.state_dict().items() if f".{ROUTER_ATTR}." not in k}
    model.save_pretrained(directory, state_dict=base_state)
    write_lime(model, directory)
    if src is not None:
        _copy_tokenizer(src, directory)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: LimeConfig | None = None,
    dtype: str = "float32",
    force: bool = False,
    verbose: bool = True,
) -> float:
    """Write a limeified copy of ``src`` to ``dst``; returns the probe batch's max abs logit diff.

    ``dst`` holds the base weights (safetensors, loadable by plain ``from_pretrained``), the
    router adapter and configs. It is written to a temporary directory beside it and renamed
    at the end, so an interrupted run leaves no ``dst``. ``src`` is only read.
    """
    dst = Path(dst)
    if dst.exists() and not force:
        raise LimeError(f"{dst} exists; pass --force (force=True) to replace it")
    directory, _ = _source(src)
    if (directory / CONFIG_NAME).is_file() or saved_router_tensors(directory):
        raise LimeError(
            f"{src} already has LIMe routers; converting it would reset them to a fresh init. Load it "
            f"with limeify.from_pretrained({str(src)!r}), and save a copy with limeify.save_pretrained(model, dst)"
        )
    from tqdm.auto import tqdm

    say = print if verbose else (lambda *a, **k: None)
    steps = tqdm(total=4, desc="convert", unit="step", disable=not verbose)
    steps.set_postfix_str("loading")
    model = load_pretrained_base(src, dtype)
    steps.update()
    steps.set_postfix_str("tracing")
    probe = default_example_inputs(model, batch=2, seq_len=16)
    before = _probe_logits(model, probe)
    limeify(model, config)
    steps.update()
    steps.set_postfix_str("checking")
    diff = (_probe_logits(model, probe) - before).abs().max().item()
    steps.update()
    steps.set_postfix_str("writing")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        with staged_directory(dst, keep=False) as tmp:
            _write(model, tmp, src)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    steps.update()
    steps.close()
    say(f"function preservation on a probe batch: max abs logit diff = {diff:.3g}")
    say(f"wrote {dst}; load it with limeify.from_pretrained({str(dst)!r})")
    return diff


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save a limeified transformers model so that :func:`from_pretrained` restores it exactly.

    Like ``model.save_pretrained``, plus the router adapter beside the base weights (which
    plain transformers loads as the base model). Written to a temporary directory beside
    ``directory`` and renamed into place, replacing what was there.
    """
    lime_state(model)  # raises unless limeified
    if distributed.is_sharded(model):
        raise LimeError(
            "save_pretrained writes whole weights from one process; for a fully_shard-ed model use "
            "limeify.save_lime (a collective: rank 0 writes the gathered routers) and save the base "
            "weights with torch.distributed.checkpoint"
        )
    with staged_directory(directory) as tmp:
        _write(model, tmp)
    return Path(directory)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _copy_tokenizer(src, dst: Path) -> None:
    from transformers import AutoTokenizer

    directory, extra = _source(src)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError):
        return
    tokenizer.save_pretrained(dst)


def from_pretrained(path: str | os.PathLike, verify_sites: bool = False, **kwargs) -> nn.Module:
    """Load a checkpoint written by ``limeify convert`` as a ready limeified model.

    The base weights and the adapter were written together, so the attention sites saved by
    ``convert`` are used without tracing the model again; ``verify_sites=True`` re-discovers
    them and checks they match (see :func:`limeify.load_lime`). Other keyword arguments go to
    the transformers ``from_pretrained``.
    """
    from transformers import AutoConfig

    path = Path(path)
    adapter = (path / CONFIG_NAME).is_file()
    tensors = {} if adapter else saved_router_tensors(path)
    if not adapter and not tensors:
        raise LimeError(
            f"{path} has no {CONFIG_NAME} and no LIMe routers in its weights; convert a base checkpoint with "
            f"`limeify convert SRC {path}`, or save a limeified model with limeify.save_pretrained(model, dir)"
        )
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path, local_files_only=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lime_router.*")
        model = _model_class(config).from_pretrained(path, config=config, local_files_only=True, **kwargs).eval()
    if adapter:
        return load_lime(model, path, verify_sites=verify_sites)
    return load_state_routers(model, tensors)


def load_state_routers(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Limeify ``model`` with the routers found in its own state_dict keys (``<attention>.lime_router.*``).

    Which sites have routers comes from the keys; the mechanism is the registered one whose
    routers have exactly these tensor names and shapes.
    """
    sites = discover_sites(model)
    shared = shared_attention(sites)
    by_site = {}
    for site in sites:
        prefix = router_prefix(site, site.attention in shared)
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if own:
            by_site[site.layer] = own
    if sum(map(len, by_site.values())) != len(tensors):
        raise LimeError("some saved router tensors belong to no attention site discovery finds in this model")
    matches = [name for name, cls in MECHANISMS.items()
               if all({k: tuple(v.shape) for k, v in cls(sites[layer].position, sites[layer], "identity").state_dict().items()}
                      == {k: tuple(v.shape) for k, v in own.items()} for layer, own in by_site.items())]
    if len(matches) != 1:
        raise LimeError(
            f"the saved router tensors match {matches or 'no'} registered mechanism(s); save with "
            "limeify.save_pretrained(model, dir), which records the LimeConfig"
        )
    layers: dict[str, list[int]] = {}
    for layer in sorted(by_site):
        layers.setdefault(sites[layer].stack, []).append(sites[layer].position)
    limeify(model, LimeConfig(mechanism=matches[0], layers=layers, sites=sites))
    try:
        for layer, router in routers(model).items():
            router.load_state_dict(by_site[layer])
    except BaseException:
        unlimeify(model)
        raise
    return model
