"""Completions from an OpenAI-compatible HTTP endpoint (a hosted API, vLLM, llama.cpp, ...).

``POST {api_base}/chat/completions`` with one user message (or ``POST {api_base}/completions``
with the prompt as text), JSON in and out, through the standard library only. The key is read
from ``$OPENAI_API_KEY`` at call time and sent as a bearer token; it is never stored in an
object that is logged or written, and any text quoted from the server in an error has it
masked. Rate limits (429), server errors (5xx), timeouts and refused connections are retried
with exponential backoff (``Retry-After`` is honoured, up to the cap); other HTTP errors and a
body that is not JSON stop at once, since retrying cannot fix them. After the last attempt the
error is one line naming the URL and the last failure.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from zhllama.errors import ZhllamaError

API_KEY_ENV = "OPENAI_API_KEY"
MAX_BACKOFF_S = 60.0


class _Transient(Exception):
    """A failure worth retrying (its text says what happened)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _mask(text: str) -> str:
    key = os.environ.get(API_KEY_ENV)
    return text.replace(key, "***") if key else text


def _server_message(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        error = json.loads(text).get("error")
        text = error.get("message", text) if isinstance(error, dict) else str(error or text)
    except (json.JSONDecodeError, AttributeError):
        pass
    return _mask(" ".join(text.split())[:200])


@dataclass
class ApiGenerator:
    """Sends prompts to an endpoint; :meth:`complete` answers one prompt with the reply text."""

    api_base: str
    api_model: str
    completions: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 2048
    timeout_s: float = 120.0
    max_retries: int = 5
    retry_backoff_s: float = 1.0
    concurrency: int = 4
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def label(self) -> str:
        return f"{self.api_model} at {self.api_base}"

    def cancel(self) -> None:
        """Stop retrying: requests in flight end after their current attempt."""
        self._stop.set()

    @property
    def url(self) -> str:
        return self.api_base.rstrip("/") + ("/completions" if self.completions else "/chat/completions")

    def describe(self) -> dict:
        return {
            "api_base": self.api_base,
            "api_model": self.api_model,
            "endpoint": "completions" if self.completions else "chat/completions",
            "concurrency": self.concurrency,
            "api_key_from": API_KEY_ENV if os.environ.get(API_KEY_ENV) else None,
        }

    def _body(self, prompt: str) -> bytes:
        body = {"model": self.api_model, "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.completions:
            body["prompt"] = prompt
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
        return json.dumps(body, ensure_ascii=False).encode("utf-8")

    def _post(self, prompt: str) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(API_KEY_ENV)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=self._body(prompt), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            detail = f"HTTP {e.code} {e.reason}: {_server_message(e.read())}"
            if e.code == 429 or e.code >= 500:
                retry_after = e.headers.get("Retry-After") if e.headers else None
                raise _Transient(detail, float(retry_after) if retry_after and retry_after.isdigit() else None) from e
            hint = f"; set ${API_KEY_ENV}" if e.code in (401, 403) else "; check --api-base and --api-model"
            raise ZhllamaError(f"{self.url}: {detail}{hint}") from e
        except (TimeoutError, socket.timeout) as e:
            raise _Transient(f"no answer within --request-timeout {self.timeout_s:g} s") from e
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Transient(f"no answer within --request-timeout {self.timeout_s:g} s") from e
            raise _Transient(f"cannot connect: {getattr(reason, 'strerror', None) or reason}") from e
        except (ConnectionError, http.client.HTTPException) as e:  # e.g. dropped mid-answer
            raise _Transient(f"connection failed: {type(e).__name__}: {e}") from e

    def _text(self, raw: bytes) -> str:
        try:
            answer = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            shown = _mask(" ".join(raw.decode("utf-8", "replace").split())[:80])
            raise ZhllamaError(
                f"{self.url}: the endpoint answered non-JSON ({shown!r}); is --api-base an OpenAI-compatible base URL (usually ending in /v1)?"
            ) from e
        try:
            choice = answer["choices"][0]
            text = choice["text"] if self.completions else choice["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise ZhllamaError(f"{self.url}: the answer has no {'choices[0].text' if self.completions else 'choices[0].message.content'}; is this an OpenAI-compatible endpoint?") from e
        return text if isinstance(text, str) else ""

    def complete(self, prompt: str) -> str:
        """The reply to ``prompt``, retrying transient failures; raises :class:`ZhllamaError`."""
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                return self._text(self._post(prompt))
            except _Transient as e:
                last = e
                if attempt + 1 < attempts:
                    wait = max(self.retry_backoff_s * 2**attempt, e.retry_after or 0.0)
                    if self._stop.wait(min(MAX_BACKOFF_S, wait)):
                        break
        raise ZhllamaError(f"{self.url}: {last} (after {attempts} attempts); check that the server is up and --api-base") from last

