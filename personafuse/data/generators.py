"""Chat generators: anything that turns a batch of conversations into replies.

Synthesis only needs :class:`ChatGenerator`; two implementations ship. :class:`HFChatGenerator`
runs a local transformers model (batched, left-padded). :class:`OpenAIChatGenerator` calls any
OpenAI-compatible ``/chat/completions`` server (vLLM, TGI, llama.cpp, hosted APIs) with retries,
rate limiting and concurrent requests. :func:`make_generator` builds either from a config dict.

Sampling options use one vocabulary for both backends: ``temperature``, ``top_p`` and
``max_new_tokens`` (sent to OpenAI servers as ``max_tokens``); per-call keyword arguments override
the constructor's defaults.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import httpx
import torch

Conversation = list[dict[str, str]]


class GenerationError(RuntimeError):
    """A generator gave up: the message names the endpoint, the status and what the server said."""


@runtime_checkable
class ChatGenerator(Protocol):
    def generate(self, conversations: list[Conversation], **sampling: Any) -> list[str]:
        """One reply per conversation, in order."""
        ...


class HFChatGenerator:
    """Generate with a local transformers causal LM through its tokenizer's chat template.

    Conversations are batched ``batch_size`` at a time with left padding (so every prompt ends at
    the same position and new tokens line up). ``temperature == 0`` decodes greedily. Sampling is
    reproducible: batch ``n`` seeds a forked RNG with ``seed + n``, leaving the global RNG untouched.
    The model should be in eval mode, or dropout randomises even greedy replies.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.95, seed: int = 0):
        if tokenizer.chat_template is None:
            raise ValueError("HFChatGenerator needs a tokenizer with a chat_template (use an instruct model's tokenizer)")
        if tokenizer.pad_token is None:
            # Padded positions are masked out, so any token will do; EOS is what most chat models use.
            tokenizer.pad_token = tokenizer.eos_token
        self.model, self.tokenizer, self.batch_size, self.seed = model, tokenizer, batch_size, seed
        self.defaults = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        self._calls = 0

    def generate(self, conversations: list[Conversation], **sampling: Any) -> list[str]:
        options = {**self.defaults, **sampling}
        replies = []
        for start in range(0, len(conversations), self.batch_size):
            replies.extend(self._generate_batch(conversations[start:start + self.batch_size], options))
        return replies

    def _generate_batch(self, conversations: list[Conversation], options: dict[str, Any]) -> list[str]:
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                 for c in conversations]
        # The chat template already writes BOS where the model wants it.
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                                add_special_tokens=False).to(self.model.device)
        kwargs = _hf_generate_kwargs(options)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(self.seed + self._calls)
            self._calls += 1
            output = self.model.generate(**inputs, pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def _hf_generate_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """Map the shared sampling vocabulary onto ``model.generate``; temperature 0 means greedy."""
    options = dict(options)
    temperature, top_p = options.pop("temperature"), options.pop("top_p")
    if temperature == 0:
        return {"do_sample": False, **options}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, **options}


class OpenAIChatGenerator:
    """Call an OpenAI-compatible ``{base_url}/chat/completions`` endpoint.

    Args:
        base_url: server root including the API version, e.g. ``http://localhost:8000/v1``.
        model: model name sent with every request.
        api_key: bearer token; defaults to ``$OPENAI_API_KEY`` (local servers usually need none).
        timeout: seconds per request.
        max_retries: extra attempts after a timeout, connection error, 429 or 5xx; other
            statuses fail at once because retrying cannot fix them.
        backoff: the first retry waits ``backoff`` seconds, doubling each time (a numeric
            ``Retry-After`` header from the server wins).
        requests_per_minute: start at most this many requests per minute across all threads.
        concurrency: requests in flight at once; replies still come back in input order.
        max_new_tokens, temperature, top_p: default sampling options.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60,
                 max_retries: int = 3, backoff: float = 1.0, requests_per_minute: float | None = None,
                 concurrency: int = 4, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.95):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.max_retries, self.backoff, self.concurrency = model, max_retries, backoff, concurrency
        self.defaults = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self._limiter = _RateLimiter(requests_per_minute)

    def generate(self, conversations: list[Conversation], **sampling: Any) -> list[str]:
        payload = self._payload({**self.defaults, **sampling})
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda c: self._complete({**payload, "messages": c}), conversations))

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> OpenAIChatGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _payload(self, options: dict[str, Any]) -> dict[str, Any]:
        options = dict(options)
        return {"model": self.model, "max_tokens": options.pop("max_new_tokens"), **options}

    def _complete(self, payload: dict[str, Any]) -> str:
        """One request with retries; the error after the last attempt says what the server last did."""
        for attempt in range(self.max_retries + 1):
            self._limiter.wait()
            try:
                response = self.client.post(self.url, json=payload)
            except httpx.TransportError as e:  # timeouts and connection failures
                problem, retry_after = f"{type(e).__name__}: {e}", None
            else:
                if response.status_code == 200:
                    return self._reply_text(response)
                problem = f"status {response.status_code}: {_excerpt(response.text)}"
                if not _retryable(response.status_code):
                    raise GenerationError(f"POST {self.url} failed with {problem}")
                retry_after = _retry_after(response)
            if attempt < self.max_retries:
                time.sleep(retry_after if retry_after is not None else self.backoff * 2**attempt)
        raise GenerationError(f"POST {self.url} failed after {self.max_retries + 1} attempts; last: {problem}")

    def _reply_text(self, response: httpx.Response) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise GenerationError(
                f"POST {self.url} returned status 200 without choices[0].message.content: {_excerpt(response.text)}"
            ) from None
        if not isinstance(content, str):
            raise GenerationError(f"POST {self.url} returned non-text content: {_excerpt(response.text)}")
        return content.strip()


class _RateLimiter:
    """Spaces request starts at least ``60 / requests_per_minute`` seconds apart, across threads."""

    def __init__(self, requests_per_minute: float | None):
        self.interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        time.sleep(start - now)


def _retryable(status: int) -> bool:
    """Rate limits and server errors can pass; a bad request or a wrong key will not."""
    return status in (408, 429) or status >= 500


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _excerpt(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def make_generator(spec: Mapping[str, Any]) -> ChatGenerator:
    """Build a generator from a config dict (what the Hydra data configs hold).

    ``{"backend": "openai", "base_url": ..., "model": ..., <OpenAIChatGenerator options>}`` or
    ``{"backend": "hf", "model": <local dir or "embedded">, "dtype": "float32", "device": None, <HFChatGenerator
    options>}``; for ``hf`` the model loads like every base model here (``load_base_model``: local files only).
    """
    spec = dict(spec)
    backend = spec.pop("backend", None)
    if backend == "openai":
        return OpenAIChatGenerator(**spec)
    if backend == "hf":
        return _load_hf_generator(**spec)
    raise ValueError(f"generator backend must be 'hf' or 'openai', got {backend!r}")


def _load_hf_generator(model: str, dtype: str = "float32", device: str | None = None, **options: Any) -> HFChatGenerator:
    from personafuse.base_models import load_base_model

    lm, tokenizer = load_base_model(model, dtype=dtype)
    lm.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return HFChatGenerator(lm, tokenizer, **options)
