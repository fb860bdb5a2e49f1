"""A second device for machines that have one: ``spare``, a PyTorch backend written in Python
whose tensors live in CPU memory but count as another device.

Importing this module registers it for the whole process (PrivateUse1 cannot be unregistered),
so only the subprocess that ``test_split_devices.py`` starts imports it. What makes it a fair
stand-in for a second GPU: every op on ``spare`` tensors runs here, and an op that mixes a
``spare`` tensor with a CPU tensor (other than a 0-dim scalar) raises, exactly as CUDA does;
only copies (``.to``, ``copy_``) cross devices. Autograd, ``nn.Module.to`` and accelerate's
``dispatch_model`` work on it unchanged.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map
from torch.utils.backend_registration import _DummyBackendModule, _setup_privateuseone_for_python_backend

NAME = "spare"


class _Module(_DummyBackendModule):
    """``torch.spare``: what torch asks of a device module (checkpointing asks for autocast dtypes)."""

    def get_amp_supported_dtype(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]


_setup_privateuseone_for_python_backend(NAME, backend_module=_Module())
DEVICE = torch.device(NAME, 0)
_CROSSING = (torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default)


class SpareTensor(torch.Tensor):
    """A ``spare`` tensor: a CPU tensor (``inner``) under another device's name."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
                                                dtype=inner.dtype, device=DEVICE)
        t.inner = inner
        return t

    def __repr__(self) -> str:
        return f"SpareTensor({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _on_spare(device) -> bool:
    return device is not None and torch.device(device).type == NAME


def _run(func, args, kwargs):
    devices = set()
    wrappers = {}  # in-place and out= ops return their argument itself, so they get its wrapper back

    def unwrap(x):
        if isinstance(x, SpareTensor):
            devices.add(NAME)
            wrappers[id(x.inner)] = x
            return x.inner
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            devices.add(x.device.type)
        return x

    args, kwargs = tree_map(unwrap, (args, kwargs))
    if len(devices) > 1 and func not in _CROSSING:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found {sorted(devices)} ({func})")
    spare_out = NAME in devices
    if "device" in kwargs and kwargs["device"] is not None:
        spare_out = _on_spare(kwargs["device"])
        if spare_out:
            kwargs = {**kwargs, "device": torch.device("cpu")}
    out = func(*args, **kwargs)

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) in wrappers:
            return wrappers[id(x)]
        return SpareTensor(x) if spare_out else x

    return tree_map(wrap, out)


# Factory functions (torch.empty(..., device="spare")) carry no spare tensor to dispatch on.
_lib = torch.library.Library("_", "IMPL")
_lib.fallback(lambda op, *args, **kwargs: _run(op, args, kwargs), dispatch_key="PrivateUse1")

# torch.tensor(data, device=...) builds below the Python dispatcher, which a Python backend
# cannot serve: build on the CPU and move.
_tensor = torch.tensor


def _tensor_then_move(data, *args, device=None, **kwargs):
    t = _tensor(data, *args, **kwargs)
    return t.to(device) if _on_spare(device) else _tensor(data, *args, device=device, **kwargs)


torch.tensor = _tensor_then_move
# accelerate empties the accelerator's cache after moving weights; a Python backend has none.
torch.accelerator.empty_cache = lambda: None
