"""An OpenAI-compatible HTTP server on 127.0.0.1 for ``zhllama instruct`` tests and bench/instruct.py.

:class:`StubServer` answers ``POST /v1/chat/completions`` and ``POST /v1/completions`` the way
the real endpoints do (``choices[0].message.content`` / ``choices[0].text``), with replies that
plant what the filters must catch. Requests are numbered in arrival order; the first
``faults`` requests misbehave, one fault each (``""``: none): ``"500"`` (an HTTP 500), ``"timeout"`` (silent for
``slow_s`` seconds, then drops the connection), ``"429"``, ``"401"`` (quoting the key back), ``"html"`` (a 200 with a non-JSON body). Content
replies (numbered separately, from 0) follow :func:`planted_reply`.

Every fresh instruction is built from its own run of CJK characters, so fresh instructions
share no token with each other (ROUGE-L 0) and the only drops are the planted ones.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEED_INSTRUCTION = "把下面的文言文翻译成现代汉语。"  # in the stub's seed file (and zhllama's bundled set)
# a one-character change of the seed: ROUGE-L 13/14 on characters
NEAR_SEED = "把下面的文言文翻译成现代汉文。"


def fresh_task(n: int) -> dict:
    """The n-th fresh task: an instruction of 8 characters no other fresh task uses."""
    start = 0x4E00 + 300 + 8 * n
    text = "".join(chr(start + i) for i in range(8))
    return {"instruction": text, "input": "", "output": f"回答{n}"}


def numbered(tasks: list[dict]) -> str:
    """Tasks in Alpaca's numbered text format."""
    parts = []
    for i, t in enumerate(tasks, 1):
        parts.append(f"{i}. Instruction: {t['instruction']}\n{i}. Input:\n{t['input'] or '<noinput>'}\n{i}. Output:\n{t['output']}")
    return "\n###\n".join(parts)


# What each planted reply drops, for the tests to compare with the run's counts.
PLANTED_DROPS = {
    0: {"similar to a kept or seed instruction (ROUGE-L)": 2, "exact duplicate": 1},
    1: {"unparseable reply": 1},
    2: {"asks for images, audio, video or files": 1},
    3: {"empty output": 1, "instruction too short": 1, "malformed record": 1},
}
PLANTED_KEPT = {0: 2, 1: 0, 2: 2, 3: 1}  # later replies: 3 fresh tasks each


def planted_reply(index: int, fresh) -> str:
    """The text of content reply ``index``; ``fresh()`` returns the next fresh task."""
    if index == 0:  # fenced JSON: two fresh, a near-duplicate of the first, an exact duplicate, a near-seed
        a, b = fresh(), fresh()
        near = dict(a, instruction=a["instruction"][:-1] + "甲")
        tasks = [a, b, near, dict(a), {"instruction": NEAR_SEED, "input": "学而时习之", "output": "学习"}]
        return "好的，以下是新任务：\n```json\n" + json.dumps(tasks, ensure_ascii=False, indent=1) + "\n```\n"
    if index == 1:  # a malformed reply
        return "抱歉，我不能按这个格式回答。"
    if index == 2:  # Alpaca's numbered text: two fresh tasks and one that asks for a picture
        return numbered([fresh(), {"instruction": "根据这张图片描述画面里的人物", "input": "", "output": "略"}, fresh()])
    if index == 3:  # JSON: one fresh, an empty output, a too-short instruction, a record without output
        tasks = [fresh(), dict(fresh(), output=" "), {"instruction": "好", "input": "", "output": "嗯"}, {"instruction": "缺少回答的任务"}]
        return json.dumps(tasks, ensure_ascii=False)
    return json.dumps([fresh(), fresh(), fresh()], ensure_ascii=False)


class StubServer:
    """Serve in a daemon thread; use as a context manager. ``url`` is the API base (``.../v1``)."""

    def __init__(self, faults: list[str] | tuple[str, ...] = (), *, slow_s: float = 1.0, delay_s: float = 0.0, reply=planted_reply):
        self.faults = list(faults)
        self.slow_s, self.delay_s, self.reply = slow_s, delay_s, reply
        self.lock = threading.Lock()
        self.requests = 0
        self.content_replies = 0
        self.fresh_count = 0
        self.authorization: list[str | None] = []
        self.paths: list[str] = []
        self.bodies: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "StubServer":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _fresh(self) -> dict:
        task = fresh_task(self.fresh_count)
        self.fresh_count += 1
        return task

    def _answer(self, path: str, body: dict) -> tuple[int, bytes, str] | None:
        with self.lock:
            number = self.requests
            self.requests += 1
            fault = (self.faults[number] if number < len(self.faults) else "") or None
            if fault is None:
                text = self.reply(self.content_replies, self._fresh)
                self.content_replies += 1
        if fault == "500":
            return 500, json.dumps({"error": {"message": "internal error"}}).encode(), "application/json"
        if fault == "429":
            return 429, json.dumps({"error": {"message": "rate limited"}}).encode(), "application/json"
        if fault == "401":  # as some servers do: the rejected key quoted back in the message
            message = f"Incorrect API key provided: {self.authorization[-1]}"
            return 401, json.dumps({"error": {"message": message}}).encode(), "application/json"
        if fault == "html":
            return 200, b"<html><body>Welcome to nginx!</body></html>", "text/html"
        if fault == "timeout":  # a hung server: silent for slow_s, then the connection drops
            time.sleep(self.slow_s)
            return None
        time.sleep(self.delay_s)
        choice = {"index": 0, "finish_reason": "stop"}
        if path.endswith("/chat/completions"):
            choice["message"] = {"role": "assistant", "content": text}
            kind = "chat.completion"
        else:
            choice["text"] = text
            kind = "text_completion"
        answer = {"id": f"stub-{number}", "object": kind, "model": body.get("model"), "choices": [choice]}
        return 200, json.dumps(answer, ensure_ascii=False).encode("utf-8"), "application/json"

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with stub.lock:
                    stub.authorization.append(self.headers.get("Authorization"))
                    stub.paths.append(self.path)
                    stub.bodies.append(body)
                if self.path not in ("/v1/chat/completions", "/v1/completions"):
                    status, payload, kind = 404, b'{"error": {"message": "no such route"}}', "application/json"
                else:
                    answer = stub._answer(self.path, body)
                    if answer is None:
                        self.close_connection = True
                        return
                    status, payload, kind = answer
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a planted timeout)

            def log_message(self, *args):
                pass

        return Handler


def unused_port() -> int:
    """A local port nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stub_main() -> None:
    """``python tests/instruct_fixtures.py [--faults 500,timeout] [--delay S]``: serve until killed, printing the URL."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--faults", default="")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    with StubServer([f for f in args.faults.split(",") if f], delay_s=args.delay) as stub:
        print(stub.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    stub_main()
