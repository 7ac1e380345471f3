"""The one error tree of flashtensors.

Every error carries a ``hint``: the next thing the user should do (usually a command). The CLI prints
``Error: <message>`` and the hint on one more line; tracebacks only appear with ``FLASH_DEBUG=1``.
"""

from __future__ import annotations


class FlashError(Exception):
    """Base of every error flashtensors raises on purpose."""

    default_hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class ConfigError(FlashError):
    """A setting or environment variable has a value we cannot use."""

    default_hint = "check `flash --help` for the FLASH_* variables and their accepted values"


class FormatError(FlashError):
    """A checkpoint file is not a valid safetensors file (bad header, offsets, dtype, size...)."""

    default_hint = "the file is damaged or not safetensors: pull the model again (`flash pull MODEL`)"


class ModelNotFound(FlashError):
    """A model id or path names nothing we can find."""

    default_hint = "run `flash list` to see local models, or `flash pull MODEL` to fetch one"


class StoreError(FlashError):
    """The local model store could not complete an operation (locked, disk full, permissions...)."""


class IntegrityError(StoreError):
    """A stored file no longer matches the hash recorded in its manifest."""

    default_hint = "the stored copy is damaged: run `flash pull MODEL --force` to fetch it again"


class PullError(FlashError):
    """Fetching a model failed (network, auth, missing files)."""


class DeviceError(FlashError):
    """The requested device cannot be used (no CUDA, out of memory, bad device string)."""


class PoolExhausted(FlashError):
    """The pinned RAM pool or the GPU tier has no room for what was asked."""

    default_hint = "raise mem_pool_size / gpu_memory_utilization, or unload a model (`flash unload MODEL`)"


class BackendError(FlashError):
    """A backend (transformers, vllm) is missing or refused the model."""


class DaemonNotRunning(FlashError):
    """The flash daemon could not be reached."""

    default_hint = "start it with `flash start`"
