"""The engine protocol serving depends on. It knows no backend: `factory.build_engine`
chooses one by name and imports it lazily."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from loraloop.core.adapters.version import AdapterVersion


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    adapter: AdapterVersion | None  # None: the base model (no adapter yet)
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class TokenChunk:
    """Tokens produced since the previous chunk of a request, with their text."""

    token_ids: list[int]
    logprobs: list[float]
    text: str


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0


def encode_with(
    tokenizer: Any, prompt: str | None, messages: list[tuple[str, str]] | None
) -> list[int]:
    """Token ids of chat messages through the tokenizer's chat template (with the
    generation prompt); a plain prompt is one user message (GenerateRequest.prompt), never
    raw text to continue. Every engine encodes this one way."""
    if messages is None:
        messages = [("user", prompt or "")]
    chat = [{"role": r, "content": c} for r, c in messages]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


class AdapterLoadError(RuntimeError):
    """An adapter version could not be loaded.

    `transient` is False for integrity errors (a checksum mismatch, a file that does not
    parse, a format this server cannot use): the version will never load here. It is True
    when the failure may pass (an OSError such as EMFILE or EIO, the engine refusing the
    adapter for now): the version is tried again a little later."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def adapter_load_error(ref: AdapterVersion, exc: BaseException) -> AdapterLoadError:
    """AdapterLoadError for `exc` from reading `ref`: transient when an OSError caused it
    (readers wrap I/O errors in ValueError; the cause chain still names them)."""
    transient = False
    cause: BaseException | None = exc
    while cause is not None and not transient:
        transient = isinstance(cause, OSError)
        cause = cause.__cause__
    return AdapterLoadError(f"adapter {ref.user_id} v{ref.version}: {exc}", transient=transient)


class Engine(abc.ABC):
    """Generates with a base model plus per-request adapters, batching across users."""

    model_id: str

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and start the scheduler."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Finish running requests, then release the model."""

    @abc.abstractmethod
    def encode(self, prompt: str | None, messages: list[tuple[str, str]] | None) -> list[int]:
        """Token ids of chat messages via the chat template; a plain prompt is one user
        message (`encode_with`)."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Yield chunks as tokens are produced; raises AdapterLoadError before the first."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run a request to completion."""
        result = GenerationResult(prompt_tokens=len(request.prompt_token_ids))
        async for chunk in self.stream(request):
            result.token_ids += chunk.token_ids
            result.logprobs += chunk.logprobs
            result.text += chunk.text
        result.finish_reason = self.finish_reason(result.token_ids, request.max_tokens)
        return result

    @abc.abstractmethod
    def drop_user(self, user_id: str) -> None:
        """Forget a deleted user's resident adapters."""

    @abc.abstractmethod
    def finish_reason(self, token_ids: list[int], max_tokens: int) -> str:
        """'stop' when generation ended on end-of-sequence, else 'length'."""
