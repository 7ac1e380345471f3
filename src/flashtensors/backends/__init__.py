"""Backends: what turns a folder of weights into something that runs (transformers, vLLM, ...).

A backend is a class with one method, ``load(model_dir, dtype, device, **kwargs)``, registered under a
name. Built-in backends are registered by import path so that naming one never imports another's
dependencies (torch, transformers, vllm stay unimported until a backend is actually used).

Example:
    >>> from flashtensors.backends import Backend, register_backend
    >>> @register_backend("echo")  # doctest: +SKIP
    ... class Echo(Backend):
    ...     def load(self, model_dir, dtype, device, **kwargs):
    ...         return model_dir
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from flashtensors.errors import BackendError

__all__ = ["Backend", "backend_names", "get_backend", "register_backend"]


class Backend(ABC):
    """Loads a model folder (config + safetensors + tokenizer files) into a runnable model object."""

    name: str = ""

    @abstractmethod
    def load(self, model_dir: Path, dtype: str | None, device: str | None, **kwargs: Any) -> Any:
        """Load the model in ``model_dir``.

        Args:
            model_dir: a local folder holding the model's files (already resolved and pulled).
            dtype: "bfloat16", "float16", "float32", "auto"/None (the checkpoint's own dtype).
            device: "cpu", "cuda", "cuda:N", or None for the default device.
            **kwargs: backend-specific options.

        Returns:
            The backend's model object.

        Raises:
            BackendError: the backend is missing or refuses the model.
        """


B = TypeVar("B", bound=type[Backend])

# name -> the class, or "module:Class" for built-ins that are imported only when used.
_REGISTRY: dict[str, type[Backend] | str] = {
    "transformers": "flashtensors.backends.transformers_backend:TransformersBackend",
}
_lock = threading.Lock()


def vllm_not_built() -> BackendError:
    """The error for the vLLM backend. It is part of the promise (``ft.activate_vllm_integration()``,
    ``backend="vllm"``) but not built: asking for it says so, rather than that the name is unknown."""
    return BackendError(
        "the vLLM backend (and ft.activate_vllm_integration) is not built yet",
        hint='load with backend="transformers" (the default; CLI: --backend transformers), which reads the '
        "weights with the same engine",
    )


def register_backend(name: str, backend: type[Backend] | str | None = None) -> Any:
    """Register a backend class under ``name`` (replacing any earlier one of that name).

    Use as a decorator (``@register_backend("vllm")``) or as a call with a class or a lazy
    ``"package.module:Class"`` path.

    Args:
        name: the name users pass as ``backend=``.
        backend: the class or its import path; omitted when used as a decorator.

    Returns:
        The class (decorator form), or None.

    Example:
        >>> register_backend("vllm", "flashtensors.backends.vllm_backend:VllmBackend")  # doctest: +SKIP
    """

    def _add(target: B | str) -> B | str:
        with _lock:
            _REGISTRY[name] = target
        return target

    if backend is None:
        decorator: Callable[[B], B] = _add  # type: ignore[assignment]
        return decorator
    _add(backend)
    return None


def backend_names() -> list[str]:
    """The names of every registered backend, sorted."""
    with _lock:
        return sorted(_REGISTRY)


def get_backend(name: str) -> Backend:
    """An instance of the backend registered as ``name``.

    Raises:
        BackendError: no backend has that name (the message lists the valid ones), or its module
            cannot be imported (a missing optional dependency: the hint names the extra to install).
    """
    with _lock:
        entry = _REGISTRY.get(name)
    if entry is None and name == "vllm":
        raise vllm_not_built()
    if entry is None:
        valid = ", ".join(backend_names())
        raise BackendError(
            f"unknown backend {name!r}; valid backends: {valid}",
            hint=f'pass one of: {valid} (e.g. backend="transformers", CLI: --backend transformers)',
        )
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise BackendError(
                f"backend {name!r} needs the package {exc.name!r}, which is not installed",
                hint=f"pip install 'flashtensors[{name}]'",
            ) from exc
        entry = getattr(module, attr)
    assert isinstance(entry, type)
    return entry()
