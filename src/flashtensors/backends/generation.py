"""Text generation for models loaded by the transformers backend, in vLLM's shapes.

``FlashModel.generate(prompts, sampling_params)`` takes what ``vllm.LLM.generate`` takes (a prompt, a
list of prompts, ``{"prompt_token_ids": [...]}``; any object with vLLM's ``SamplingParams`` attribute
names, a real ``vllm.SamplingParams`` included) and returns ``RequestOutput``-like objects, so
``out.outputs[0].text`` works the same with either backend. ``FlashModel.stream`` yields text as it is
generated, for the CLI.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from flashtensors.backends.streaming import CancelFlag, TextStream, first_stop
from flashtensors.errors import BackendError

Prompt = str | dict[str, Any]


@dataclass
class SamplingParams:
    """Sampling options, named and defaulted as vLLM's ``SamplingParams``.

    ``temperature=0`` means greedy decoding; ``top_k <= 0`` and ``top_p=1`` disable those filters.

    Example:
        >>> params = SamplingParams(temperature=0.0, max_tokens=32)
        >>> params.top_p, params.stop
        (1.0, None)
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = False


@dataclass
class CompletionOutput:
    """One completion of a prompt (vLLM's ``CompletionOutput`` fields that apply here)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens reached)
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """All completions of one prompt; ``.outputs[0].text`` as in vLLM, ``.text`` as a shortcut."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True

    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""


@dataclass
class ModelLoadStats:
    """How a model was loaded: checkpoint bytes, weight-load and total time, read paths used."""

    nbytes: int
    weights_seconds: float  # the engine reading every tensor onto the device
    total_seconds: float  # the whole load: config, model on meta, weights, placement (not the tokenizer)
    device: str
    dtype: str
    paths: dict[str, str] = field(default_factory=dict)
    placement: str = "assigned"  # "assigned" (tensors used in place) or "transformers" (its loader)
    warmup_seconds: float | None = None  # the GPU warm-up run while the weights were read; None: none ran

    @property
    def gbps(self) -> float:
        """Checkpoint bytes per second of weight loading, in GB/s."""
        return self.nbytes / self.weights_seconds / 1e9 if self.weights_seconds > 0 else 0.0


def sampling_options(sampling_params: Any = None, **overrides: Any) -> SamplingParams:
    """Read vLLM-named options from any object (or none), then apply non-None ``overrides``.

    Raises:
        BackendError: an option is out of range.
    """
    base = SamplingParams()
    values = {f.name: getattr(sampling_params, f.name, getattr(base, f.name)) for f in fields(SamplingParams)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    opts = SamplingParams(**values)
    if opts.temperature < 0 or not 0 < opts.top_p <= 1 or opts.n < 1:
        raise BackendError(
            f"invalid sampling options: temperature={opts.temperature}, top_p={opts.top_p}, n={opts.n}",
            hint="use temperature >= 0 (0 = greedy), 0 < top_p <= 1, n >= 1",
        )
    if opts.max_tokens is not None and opts.max_tokens < 1:
        raise BackendError(
            f"max_tokens must be at least 1, not {opts.max_tokens}", hint="e.g. --max-tokens 64"
        )
    return opts


class Pending:
    """A call running on a daemon thread of its own; :meth:`result` waits for it.

    Example:
        >>> Pending(lambda: 6 * 7, name="answer").result()
        42
    """

    def __init__(self, fn: Callable[[], Any], *, name: str) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # re-raised by result(), in the caller's thread
            self._error = exc

    def result(self) -> Any:
        """The call's return value, once it has returned (its exception, re-raised, if it raised)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class FlashModel:
    """A loaded transformers model with its tokenizer, how it was loaded, and vLLM-style ``generate``.

    Attributes:
        model: the ``transformers.PreTrainedModel`` (in eval mode).
        tokenizer: its tokenizer, or None when the folder has none (waits while it is still loading).
        load_stats: a :class:`ModelLoadStats`.
        model_dir: the folder the model was loaded from.
    """

    def __init__(self, model: Any, tokenizer: Any, load_stats: ModelLoadStats, model_dir: Path) -> None:
        self.model = model
        self._tokenizer = tokenizer  # the tokenizer, None, or a Pending that gives one
        self.load_stats = load_stats
        self.model_dir = model_dir

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (None when the model has none), waiting for it while it loads in the background.

        Raises:
            Exception: whatever loading it raised (other than a missing or unreadable tokenizer, which
                gives None and a warning).
        """
        if isinstance(self._tokenizer, Pending):
            self._tokenizer = self._tokenizer.result()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value

    def __repr__(self) -> str:
        s = self.load_stats
        return (
            f"FlashModel({type(self.model).__name__}, dir={str(self.model_dir)!r}, {s.dtype} on {s.device})"
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: Any = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt, as ``vllm.LLM.generate`` does.

        Args:
            prompts: a string, ``{"prompt_token_ids": [...]}``, or a list of those.
            sampling_params: a :class:`SamplingParams`, a ``vllm.SamplingParams`` or any object with those
                attribute names; missing ones take vLLM's defaults.
            max_tokens, temperature, top_p, top_k, seed: override the matching field.

        Returns:
            One :class:`RequestOutput` per prompt, in order.

        Raises:
            BackendError: the model cannot generate, or a text prompt was given without a tokenizer.

        Example:
            >>> out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8))  # doctest: +SKIP
            >>> out[0].outputs[0].text  # doctest: +SKIP
        """
        opts = sampling_options(
            sampling_params,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
        )
        batch = prompts if isinstance(prompts, list) else [prompts]
        results = []
        stops = self._stop_strings(opts)
        for i, prompt in enumerate(batch):
            ids = self._encode(prompt)
            completions = []
            for j in range(opts.n):
                sample_opts = opts if opts.seed is None else replace(opts, seed=opts.seed + j)
                out = self._run_generate(ids, sample_opts)
                new = out[0, ids.shape[-1] :].tolist()
                text = self._decode(new) if self.tokenizer is not None else ""
                cut = first_stop(text, stops)
                reason = "length" if opts.max_tokens is not None and len(new) >= opts.max_tokens else "stop"
                if cut is not None:
                    text, reason = text[:cut], "stop"
                completions.append(CompletionOutput(index=j, text=text, token_ids=new, finish_reason=reason))
            text_prompt = prompt if isinstance(prompt, str) else prompt.get("prompt")
            results.append(RequestOutput(str(i), text_prompt, ids[0].tolist(), completions))
        return results

    def stream(
        self,
        prompt: Prompt,
        sampling_params: Any = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> TextStream:
        """Generate for one prompt, yielding text pieces as tokens come (see :meth:`generate`).

        Returns:
            A :class:`TextStream`; iterate it for the pieces, then read ``.stats`` and ``.text``.

        Example:
            >>> for piece in llm.stream("Once upon a time", max_tokens=32):  # doctest: +SKIP
            ...     print(piece, end="", flush=True)
        """
        if self.tokenizer is None:
            raise BackendError("streaming text needs a tokenizer, and this model folder has none")
        opts = sampling_options(
            sampling_params,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
        )
        return TextStream(self, prompt, opts)

    # ------------------------------------------------------------------ internals

    def _check_can_generate(self) -> None:
        if not self.model.can_generate():
            raise BackendError(
                f"{type(self.model).__name__} does not generate text",
                hint="use llm.model directly (e.g. llm.model(**inputs)) for encoders and classifiers",
            )

    def _encode(self, prompt: Prompt) -> torch.Tensor:
        self._check_can_generate()
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return torch.tensor([list(prompt["prompt_token_ids"])], dtype=torch.long, device=self.device)
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if not isinstance(text, str):
            raise BackendError(
                f"a prompt must be a str or {{'prompt_token_ids': [...]}}, not {type(prompt).__name__}"
            )
        if self.tokenizer is None:
            raise BackendError(
                f"{self.model_dir} has no tokenizer, so text prompts cannot be encoded",
                hint="pass {'prompt_token_ids': [...]} instead, or add tokenizer files to the model folder",
            )
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _stop_strings(self, opts: SamplingParams) -> list[str]:
        if not opts.stop:
            return []
        return [opts.stop] if isinstance(opts.stop, str) else list(opts.stop)

    def _generation_config(self, opts: SamplingParams) -> Any:
        gen = copy.deepcopy(self.model.generation_config)
        gen.max_new_tokens = opts.max_tokens if opts.max_tokens is not None else 2048
        gen.num_return_sequences = 1
        gen.num_beams = 1
        gen.repetition_penalty = opts.repetition_penalty
        if opts.temperature == 0:
            # Greedy: unset the sampling knobs so the model's own defaults raise no warnings.
            gen.do_sample, gen.temperature, gen.top_p, gen.top_k, gen.min_p = False, None, None, None, None
        else:
            gen.do_sample = True
            gen.temperature, gen.top_p = opts.temperature, opts.top_p
            gen.top_k = max(opts.top_k, 0)  # vLLM's -1/0 mean "no top-k"; 0 disables it in transformers
            gen.min_p = opts.min_p or None
        if opts.ignore_eos:
            gen.min_new_tokens = gen.max_new_tokens
        if gen.pad_token_id is None:
            eos = gen.eos_token_id
            gen.pad_token_id = eos[0] if isinstance(eos, list) and eos else eos
        stops = self._stop_strings(opts)
        gen.stop_strings = stops or None
        return gen

    def _run_generate(
        self, ids: torch.Tensor, opts: SamplingParams, streamer: Any = None, stop: CancelFlag | None = None
    ) -> torch.Tensor:
        from transformers import StoppingCriteriaList

        self._check_can_generate()
        gen = self._generation_config(opts)
        kwargs: dict[str, Any] = {"generation_config": gen, "attention_mask": torch.ones_like(ids)}
        if streamer is not None:
            kwargs["streamer"] = streamer
        if stop is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
        if gen.stop_strings:
            kwargs["tokenizer"] = self.tokenizer
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices, enabled=opts.seed is not None):
            if opts.seed is not None:
                torch.manual_seed(opts.seed)
            return self.model.generate(ids, **kwargs)
