"""Checkpoint formats: safetensors header parsing and validation."""

from flashtensors.format.safetensors import (
    DTYPES,
    MAX_HEADER_SIZE,
    FileHeader,
    TensorInfo,
    read_header,
)

__all__ = ["DTYPES", "MAX_HEADER_SIZE", "FileHeader", "TensorInfo", "read_header"]
