"""Streaming generation: ``model.generate`` runs in a thread, text pieces come out as tokens do."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from flashtensors.backends.generation import FlashModel, Prompt, SamplingParams


@dataclass
class GenerationStats:
    """Token counts and timing of one streamed generation."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


class CancelFlag:
    """A stopping criterion that ends generation once the consumer of a stream has gone away."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _QueueStreamer:
    """Receives token ids from ``model.generate`` (the first call is the prompt) into a queue."""

    def __init__(self) -> None:
        self.queue: queue.Queue[list[int] | None] = queue.Queue()
        self.count = 0  # tokens generated, read or not
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        ids = value.reshape(-1).tolist()
        self.count += len(ids)
        self.queue.put(ids)

    def end(self) -> None:
        self.queue.put(None)


class TextStream:
    """Iterate to get text pieces as they are generated; ``stats`` is filled when iteration ends."""

    def __init__(self, owner: FlashModel, prompt: Prompt, opts: SamplingParams) -> None:
        self._owner = owner
        self._prompt = prompt
        self._opts = opts
        self.stats = GenerationStats()
        self.token_ids: list[int] = []
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        owner = self._owner
        ids = owner._encode(self._prompt)
        self.stats.prompt_tokens = int(ids.shape[-1])
        streamer = _QueueStreamer()
        cancelled = CancelFlag()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                owner._run_generate(ids, self._opts, streamer=streamer, stop=cancelled)
            except BaseException as exc:  # re-raised in the consumer below
                failure.append(exc)
            finally:
                streamer.end()

        start = time.perf_counter()
        thread = threading.Thread(target=work, name="flash-generate", daemon=True)
        thread.start()
        stops = owner._stop_strings(self._opts)
        try:
            while (chunk := streamer.queue.get()) is not None:
                if self.stats.first_token_seconds is None:
                    self.stats.first_token_seconds = time.perf_counter() - start
                self.token_ids.extend(chunk)
                text = owner._decode(self.token_ids)
                cut = first_stop(text, stops)
                if cut is not None:
                    text = text[:cut]
                # Hold back a trailing replacement char: it is usually half of a multi-byte character.
                if cut is None and text.endswith("\ufffd"):
                    continue
                if len(text) > len(self.text) and text.startswith(self.text):
                    piece, self.text = text[len(self.text) :], text
                    yield piece
                if cut is not None:
                    break
        finally:
            # Reached on a stop string, and when the caller stops iterating early: end the generation
            # thread at its next token instead of letting it run to max_tokens.
            cancelled.event.set()
            thread.join()
            self.stats.generated_tokens = streamer.count
            self.stats.seconds = time.perf_counter() - start
        if failure:
            raise failure[0]


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of ``stops`` begins in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
