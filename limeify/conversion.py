"""Converting pretrained checkpoints into limeified ones, and loading them back."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import LimeConfig
from .discovery import default_example_inputs
from .errors import LimeError
from .injection import limeify
from .persistence import CONFIG_NAME, load_lime, save_lime
from .routers import ROUTER_ATTR

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


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (umask() sets it)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    say = print if verbose else (lambda *a, **k: None)
    model = load_pretrained_base(src, dtype)
    probe = default_example_inputs(model, batch=2, seq_len=16)
    before = _probe_logits(model, probe)
    limeify(model, config)
    diff = (_probe_logits(model, probe) - before).abs().max().item()
    say(f"function preservation on a probe batch: max abs logit diff = {diff:.3g}")

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.limeify-", dir=dst.parent))
    # mkdtemp makes it private (0700); the output is an ordinary directory, so the umask decides.
    tmp.chmod(0o777 & ~_umask())
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        base_state = {k: v for k, v in model.state_dict().items() if f".{ROUTER_ATTR}." not in k}
        model.save_pretrained(tmp, state_dict=base_state)
        save_lime(model, tmp)
        _copy_tokenizer(src, tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    say(f"wrote {dst}; load it with limeify.from_pretrained({str(dst)!r})")
    return diff


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
    if not (path / CONFIG_NAME).is_file():
        raise LimeError(f"{path} has no {CONFIG_NAME}; convert a checkpoint first with `limeify convert SRC {path}`")
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path, local_files_only=True)
    model = _model_class(config).from_pretrained(path, config=config, local_files_only=True, **kwargs).eval()
    return load_lime(model, path, verify_sites=verify_sites)
