"""The local model store: ``<FLASH_HOME>/models/<org>/<name>/`` with stock files and a manifest.

See :mod:`flashtensors.store.layout` for the folder layout and :mod:`flashtensors.store.build` for how a
pull stays atomic.
"""

from flashtensors.store.catalog import list_models, remove, resolve_model_path, show, verify
from flashtensors.store.layout import ModelRef, StoreLayout, parse_model_id
from flashtensors.store.manifest import ModelRecord
from flashtensors.store.pulling import PullResult, pull

__all__ = [
    "ModelRecord",
    "ModelRef",
    "PullResult",
    "StoreLayout",
    "list_models",
    "parse_model_id",
    "pull",
    "remove",
    "resolve_model_path",
    "show",
    "verify",
]
