"""flashtensors: move model weights from disk to GPU at the speed of the hardware.

Importing this package is cheap: torch, transformers and vllm are imported only when a function that
needs them is called.

Example:
    >>> import flashtensors as ft
    >>> sd = ft.load_state_dict("path/to/checkpoint", device="cuda")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flashtensors.config import Settings, configure, get_settings
from flashtensors.errors import (
    BackendError,
    ConfigError,
    DaemonNotRunning,
    DeviceError,
    FlashError,
    FormatError,
    IntegrityError,
    ModelNotFound,
    PoolExhausted,
    PullError,
    StoreError,
)

__version__ = "0.1.0"

# Public name -> module that defines it; resolved on first access (PEP 562).
_LAZY: dict[str, str] = {
    "load_file": "flashtensors.engine.api",
    "load_state_dict": "flashtensors.engine.api",
    "iter_tensors": "flashtensors.engine.api",
    "read_header": "flashtensors.format.safetensors",
    "pull": "flashtensors.store",
    "list_models": "flashtensors.store",
    "remove": "flashtensors.store",
    "pin": "flashtensors.engine.pinned",
    "unpin": "flashtensors.engine.pinned",
    "load_model": "flashtensors.models",
    "SamplingParams": "flashtensors.backends.generation",
    "register_backend": "flashtensors.backends",
}

if TYPE_CHECKING:
    from flashtensors.backends import register_backend
    from flashtensors.backends.generation import SamplingParams
    from flashtensors.engine.api import iter_tensors, load_file, load_state_dict
    from flashtensors.engine.pinned import pin, unpin
    from flashtensors.format.safetensors import read_header
    from flashtensors.models import load_model
    from flashtensors.store import list_models, pull, remove

__all__ = [
    "BackendError",
    "ConfigError",
    "DaemonNotRunning",
    "DeviceError",
    "FlashError",
    "FormatError",
    "IntegrityError",
    "ModelNotFound",
    "PoolExhausted",
    "PullError",
    "SamplingParams",
    "Settings",
    "StoreError",
    "__version__",
    "activate_vllm_integration",
    "configure",
    "get_settings",
    "iter_tensors",
    "list_models",
    "load_file",
    "load_model",
    "load_state_dict",
    "pin",
    "pull",
    "read_header",
    "register_backend",
    "remove",
    "unpin",
]


def activate_vllm_integration() -> None:
    """Part of the promised API; the vLLM backend is not built yet.

    Raises:
        BackendError: always, with a hint to use ``backend="transformers"``.
    """
    from flashtensors.backends import vllm_not_built

    raise vllm_not_built()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flashtensors' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
