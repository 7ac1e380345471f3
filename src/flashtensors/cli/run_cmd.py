"""`flash run MODEL "prompt"` and `flash demo`: load a model in this process and generate.

Generated text goes to stdout as it comes; load and speed figures (``--verbose``) and pull progress go
to stderr. ``flash demo`` needs no network: it builds the default model, stores it, and compares the
flashtensors load with transformers' own ``from_pretrained`` on the same files.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from flashtensors.demo import DEFAULT_MODEL_ID
from flashtensors.errors import BackendError, ConfigError

_DEMO_PROMPT = "Model weights live on disk"


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _size(nbytes: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= div:
            return f"{nbytes / div:.1f} {unit}"
    return f"{nbytes} B"


def _read_prompt(prompt: str | None) -> str:
    if prompt is not None:
        return prompt
    if sys.stdin is not None and not sys.stdin.isatty():
        return sys.stdin.read()
    raise ConfigError(
        "no prompt given", hint=f'flash run MODEL "your prompt"  (e.g. flash run {DEFAULT_MODEL_ID} "Hi")'
    )


def _chat_prompt(tokenizer: Any, text: str) -> dict[str, Any] | str:
    """The prompt as the model was trained to see it: through its chat template when it has one."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return text
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return {"prompt": text, "prompt_token_ids": list(ids)}


def _sampling_params(backend: str, **values: Any) -> Any:
    if backend == "vllm":
        try:
            from vllm import SamplingParams as VllmSamplingParams
        except ImportError:
            pass
        else:
            return VllmSamplingParams(**values)
    from flashtensors.backends.generation import SamplingParams

    return SamplingParams(**values)


def _describe_load(model: str, stats: Any) -> str:
    paths = ", ".join(sorted(set(stats.paths.values()))) or "?"
    return (
        f"loaded {model} in {stats.total_seconds:.2f} s: {_size(stats.nbytes)} of weights in "
        f"{stats.weights_seconds:.3f} s ({stats.gbps:.2f} GB/s, read path: {paths}), "
        f"{stats.dtype} on {stats.device}"
    )


def run_cmd(
    model: Annotated[str, typer.Argument(help=f"store or hub id, or a folder (try {DEFAULT_MODEL_ID})")],
    prompt: Annotated[str | None, typer.Argument(help="the prompt; read from stdin when left out")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="most tokens to generate")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", help="nucleus sampling threshold")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="seed for sampling")] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cuda, cuda:N or cpu (default: cuda if any)")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="bfloat16, float16, float32 or auto")] = "bfloat16",
    backend: Annotated[str, typer.Option("--backend", help="transformers or vllm")] = "transformers",
    raw: Annotated[
        bool, typer.Option("--raw", help="send the prompt as is, without the chat template")
    ] = False,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="allow the model's own Python code to run")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="load time, GB/s and tokens/s on stderr")
    ] = False,
) -> None:
    """Load MODEL (pulling it if missing) and stream its completion of PROMPT."""
    from flashtensors.models import load_model

    text = _read_prompt(prompt)
    extra: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    llm = load_model(model, backend=backend, dtype=dtype, device=device, **extra)
    stats = getattr(llm, "load_stats", None)
    if verbose and stats is not None:
        _err(_describe_load(model, stats))
    params = _sampling_params(backend, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
    if not hasattr(llm, "stream"):  # another backend: no streaming, print the whole completion
        out = llm.generate([text], params)
        typer.echo(out[0].outputs[0].text)
        return
    stream = llm.stream(text if raw else _chat_prompt(llm.tokenizer, text), params)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose:
        s = stream.stats
        first = (
            f", first token after {s.first_token_seconds:.2f} s" if s.first_token_seconds is not None else ""
        )
        _err(f"{s.generated_tokens} tokens in {s.seconds:.2f} s ({s.tokens_per_second:.1f} tokens/s{first})")


def _prewarm(model_dir: Path) -> None:
    """Read the files once so both loaders start from the page cache (a warm load, for both)."""
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(16 << 20):
                    pass


def _best_of(n: int, fn: Any) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(n):
        result = None  # drop the previous model before the next load
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def demo_cmd(
    device: Annotated[
        str | None, typer.Option("--device", help="cuda, cuda:N or cpu (default: cuda if any)")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="tokens of the completion")] = 12,
    prompt: Annotated[str, typer.Option("--prompt", help="the prompt to complete")] = _DEMO_PROMPT,
    repeat: Annotated[int, typer.Option("--repeat", help="loads per loader; the best time counts")] = 3,
) -> None:
    """Offline tour: build the default model, store it, load it both ways, compare, and generate."""
    import torch
    import transformers

    from flashtensors.backends.transformers_backend import auto_class_for
    from flashtensors.demo import ensure_default_model
    from flashtensors.engine.devices import resolve_device
    from flashtensors.models import load_model

    dev = resolve_device(device)
    transformers.utils.logging.disable_progress_bar()  # per-tensor bars from from_pretrained: noise here
    _err(f"preparing {DEFAULT_MODEL_ID} (built locally, no download) ...")
    model_dir = ensure_default_model()
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    auto = auto_class_for(config)
    auto._model_mapping[type(config)]  # import the model code now, so neither loader's time includes it
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    _prewarm(model_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(dev)

    # Each loader is timed until the model has produced its first logits: a loader that maps the file
    # and reads it lazily (transformers on CPU) pays for its reads there, not later.
    def hf_first_logits() -> torch.Tensor:
        device_map = str(dev) if dev.type != "cpu" else None
        model = auto.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=device_map)
        transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        with torch.inference_mode():
            return model(ids).logits.cpu()

    def ft_first_logits() -> tuple[Any, torch.Tensor]:
        llm = load_model(DEFAULT_MODEL_ID, dtype="bfloat16", device=str(dev), progress=False)
        with torch.inference_mode():
            return llm, llm.model(ids).logits.cpu()

    hf_seconds, ref_logits = _best_of(repeat, hf_first_logits)
    ft_seconds, (llm, logits) = _best_of(repeat, ft_first_logits)
    same = torch.equal(logits, ref_logits)
    stats = llm.load_stats
    n_params = sum(p.numel() for p in llm.model.parameters())
    completion = llm.generate([prompt], temperature=0.0, max_tokens=max_tokens)[0].outputs[0].text

    def row(name: str, seconds: float, note: str = "") -> str:
        return f"  {name:<30} {seconds:6.3f} s  {stats.nbytes / seconds / 1e9:6.2f} GB/s  {note}".rstrip()

    lines = [
        f"{DEFAULT_MODEL_ID}: {type(llm.model).__name__}, {n_params / 1e6:.1f}M parameters, "
        f"{_size(stats.nbytes)} of bf16 weights, {dev}",
        f"load until first logits (files in page cache, best of {repeat}):",
        row("flashtensors  ft.load_model", ft_seconds, f"(weights read in {stats.weights_seconds:.3f} s)"),
        row("transformers  from_pretrained", hf_seconds),
        f"  same logits, bit for bit: {'yes' if same else 'NO'}",
        f"completion (greedy; random weights, so it is noise): {prompt} ->{completion}",
    ]
    if dev.type == "cpu":
        lines.append("note: on CPU both loaders are bound by host memory; flashtensors' gains are on GPU")
    lines.append(f'next: flash run {DEFAULT_MODEL_ID} "your prompt"   or   flash pull Qwen/Qwen3-0.6B')
    typer.echo("\n".join(lines))
    if not same:
        raise BackendError(
            "flashtensors and transformers gave different logits for the same files",
            hint="please report this with the output of `flash demo --device cpu`",
        )


def register(app: typer.Typer) -> None:
    """Add `flash run` and `flash demo` to ``app``."""
    app.command("run")(run_cmd)
    app.command("demo")(demo_cmd)
