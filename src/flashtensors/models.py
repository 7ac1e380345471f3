"""``ft.load_model``: a model id (or folder) in, a runnable model out, pulling into the store if needed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flashtensors.errors import ModelNotFound

__all__ = ["load_model", "resolve_model_dir"]


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~", ".")) or text.partition("@")[0].count("/") > 1


def resolve_model_dir(
    model_id: str | os.PathLike[str],
    *,
    pull: bool = True,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> Path:
    """The local folder of ``model_id``: the folder itself, or the store's copy (pulled if missing).

    Args:
        model_id: a folder path, or an id of the store or the hub (``org/name``, ``org/name@rev``).
            The built-in demo id ``flashtensors/tiny-random-qwen3`` is built locally, never downloaded.
        pull: fetch a hub id into the store when the store does not hold it.
        progress: show pull progress on stderr.
        trust_remote_code: when pulling, also keep the model's ``*.py`` files.

    Returns:
        The folder holding config.json, the safetensors files and the tokenizer files.

    Raises:
        ModelNotFound: no such folder, and no such model in the store (or on the hub, when pulling).
        PullError: the pull failed (network, gated repo, offline).

    Example:
        >>> resolve_model_dir("Qwen/Qwen3-0.6B")  # doctest: +SKIP
        PosixPath('/home/me/.cache/flashtensors/models/Qwen/Qwen3-0.6B')
    """
    text = os.fspath(model_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    # Imported only now: a folder needs neither, and their first import costs ~40 ms of a load.
    from flashtensors import store
    from flashtensors.demo import DEFAULT_MODEL_ID, ensure_default_model

    if isinstance(model_id, os.PathLike) or _looks_like_path(text) or path.is_file():
        raise ModelNotFound(
            f"no model folder at {text}",
            hint="pass a folder holding config.json and *.safetensors, or a model id like Qwen/Qwen3-0.6B",
        )
    if text == DEFAULT_MODEL_ID:
        return ensure_default_model(progress=progress)
    try:
        return store.resolve_model_path(text)
    except ModelNotFound:
        if not pull or "/" not in text.partition("@")[0]:
            raise
    store.pull(text, progress=progress, trust_remote_code=trust_remote_code)
    return store.resolve_model_path(text)


def load_model(
    model_id: str | os.PathLike[str],
    backend: str = "transformers",
    dtype: str | None = "bfloat16",
    device: str | None = None,
    **kwargs: Any,
) -> Any:
    """Load a model for inference, its weights read by the flashtensors engine.

    Args:
        model_id: a store or hub id (``Qwen/Qwen3-0.6B``; pulled into the store if missing), or a folder.
        backend: ``"transformers"`` (built in) or any registered backend. ``"vllm"`` is not built yet:
            it raises :class:`BackendError` before anything is pulled.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"``, or ``"auto"`` for the checkpoint's dtype.
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``; None picks ``"cuda"`` when there is one.
        **kwargs: passed to the backend (transformers: ``trust_remote_code``, ``read_path``, ``warmup``).

    Returns:
        The backend's model; for transformers a :class:`~flashtensors.backends.generation.FlashModel`
        with ``.model``, ``.tokenizer``, ``.load_stats`` and ``.generate(prompts, sampling_params)``.

    Raises:
        BackendError: unknown backend (the message lists the valid ones), or the backend refused the model.
        ModelNotFound: no such folder or model.
        PullError: the model had to be pulled and the pull failed.
        DeviceError: the device is unusable.

    Example:
        >>> import flashtensors as ft
        >>> llm = ft.load_model(model_id="Qwen/Qwen3-0.6B", dtype="bfloat16")  # doctest: +SKIP
        >>> llm.generate(["Hello"], max_tokens=16)[0].outputs[0].text  # doctest: +SKIP
    """
    from flashtensors.backends import get_backend

    impl = get_backend(backend)  # first, so a typo fails before anything is pulled
    pull_progress = kwargs.pop("progress", True)
    trust = bool(kwargs.get("trust_remote_code", False))
    model_dir = resolve_model_dir(model_id, progress=pull_progress, trust_remote_code=trust)
    return impl.load(model_dir, dtype=dtype, device=device, **kwargs)
