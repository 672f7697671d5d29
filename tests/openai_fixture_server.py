"""A local OpenAI-compatible ``/v1/chat/completions`` server with canned, deterministic answers.

Runs a ThreadingHTTPServer on 127.0.0.1 (port 0) in a thread. Tests steer failures through
attributes: ``fail_first`` answers that many requests with 500 first, ``fail_status`` picks the
status, ``delay`` sleeps before every answer (to provoke client timeouts).

Answers depend only on the prompt: a request that asks for a JSON object of trait scores gets one
(values derived from the conversation text), a request to write a message gets a message about its
domain, and any other gets ``"[<first words of the system prompt>] reply to: <last user message>"``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from personafuse.traits import BIG_FIVE


def canned_answer(messages: list[dict[str, str]]) -> str:
    text = "\n".join(m["content"] for m in messages)
    last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    if "JSON object" in text:
        digest = hashlib.sha256(text.encode()).digest()
        scores = {t: round(digest[i] / 127.5 - 1, 2) for i, t in enumerate(BIG_FIVE.traits)}
        return f"Here is my annotation:\n```json\n{json.dumps(scores)}\n```"
    match = re.search(r"assistant about (.+?)\. The writer is .*variation #(\d+)", last_user)
    if match:
        return f'"I need help with {match.group(1)}, case {match.group(2)}."'
    persona = " ".join(messages[0]["content"].split()[:10]) if messages[0]["role"] == "system" else "plain"
    return f"[{persona}] reply to: {last_user}"


class FakeOpenAIServer:
    """Context manager: ``with FakeOpenAIServer() as server: server.base_url``."""

    def __init__(self, answer: Callable[[list[dict[str, str]]], str] = canned_answer) -> None:
        self.answer = answer  # a test's scripted teacher replaces the canned answers
        self.fail_first = 0
        self.fail_status = 500
        self.delay = 0.0
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        # A short poll interval keeps shutdown (once per test) from costing the default 0.5 s.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _respond(self, body: dict) -> tuple[int, dict]:
        with self._lock:
            self.requests.append(body)
            failing = len(self.requests) <= self.fail_first
        if self.delay:
            time.sleep(self.delay)
        if failing:
            return self.fail_status, {"error": {"message": "injected failure"}}
        content = self.answer(body["messages"])
        return 200, {"object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop"}]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = server._respond(body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up; that is what the timeout test wants

            def log_message(self, *args: object) -> None:
                pass

        return Handler
