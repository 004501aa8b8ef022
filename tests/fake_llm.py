"""A fake OpenAI-compatible language model server on loopback, for the --llm-url tests without vLLM.

It serves one model on ``GET /v1/models`` and answers every ``POST /v1/chat/completions`` with the
script its ``behaviour`` names at that moment (tests switch it between requests): a whole answer,
one that breaks off, stalls, sends a line that is not JSON or a chunk of the wrong shape, a 5xx,
or an answer whose tokens decode to no text. Its life is bounded: a stalled answer waits at most
``STALL_LIMIT_S`` (or until the server is stopped), and :func:`running` always shuts it down.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "fake"
STALL_LIMIT_S = 60.0  # a stalled answer never holds a test longer than this


def event(content: str | None = None, finish: str | None = None, role: str | None = None,
          usage: tuple[int, int] | None = None, choices: bool = True) -> str:
    """One ``chat.completion.chunk`` as JSON, as vLLM streams it."""
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    body = {"id": "fake-1", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                         "total_tokens": usage[0] + usage[1]}
    return json.dumps(body)


ANSWER = [event(role="assistant", content=""), event("hello"), event(" world"), event(finish="stop"),
          event(usage=(10, 2), choices=False)]
# behaviour -> the data: lines of the answer, then what happens: "done" ([DONE]), "break" (drop the
# connection mid-body), "stall" (send nothing more until the client goes away or the limit)
SCRIPTS = {
    "answer": (ANSWER, "done"),
    "breaks_off": (ANSWER[:3], "break"),
    "stalls": (ANSWER[:3], "stall"),
    "stalls_at_once": ([], "stall"),
    "not_json": (ANSWER[:2] + ["{this is not json"], "done"),
    "list_chunk": (ANSWER[:2] + ["[1, 2]"], "done"),
    "choices_not_a_list": (ANSWER[:2] + [json.dumps({"id": "x", "object": "chat.completion.chunk",
                                                     "choices": "hello"})], "done"),
    "content_not_text": (ANSWER[:2] + [json.dumps({"id": "x", "object": "chat.completion.chunk",
                                                   "choices": [{"index": 0, "delta": {"content": 5}}]})], "done"),
    # a random model's greedy tokens that decode to nothing: the deltas carry "" (vLLM's usage counts them)
    "empty_tokens": ([event(role="assistant", content=""), event(""), event(""), event("", finish="length"),
                      event(usage=(10, 3), choices=False)], "done"),
    "empty_tokens_counted": ([event(role="assistant", content="", usage=(10, 0)), event(usage=(10, 1)),
                              event(usage=(10, 2)), event(finish="length", usage=(10, 3)),
                              event(usage=(10, 3), choices=False)], "done"),
}
MODELS_BODIES = {
    "ok": json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "test",
                                                  "max_model_len": 2048}]}).encode(),
    "not_json": b'{"object": "list", "data": [',
    "no_ids": json.dumps({"object": "list", "data": [{"object": "model", "created": 0}]}).encode(),
    "not_a_list": json.dumps({"object": "list", "data": "fake"}).encode(),
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, MODELS_BODIES[self.server.models])

    def do_POST(self):
        server = self.server
        server.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        behaviour = server.behaviour
        if behaviour == "server_error":
            self._send(500, json.dumps({"object": "error", "message": "EngineCore died", "type": "InternalServerError",
                                        "param": None, "code": 500}).encode())
            return
        lines, then = SCRIPTS[behaviour]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in lines + (["[DONE]"] if then == "done" else []):
            data = f"data: {line}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        if then == "done":
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        elif then == "break":
            self.connection.shutdown(socket.SHUT_RDWR)  # no last chunk: the body is incomplete
        elif then == "stall":
            self._stall()

    def _stall(self) -> None:
        """Sends nothing more; notes when the client hangs up (it reads EOF), bounded by the limit or shutdown."""
        waited = 0.0
        while waited < STALL_LIMIT_S and not self.server.stopping.is_set():
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            waited += 0.05
            if readable:
                try:
                    gone = self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    gone = True
                if gone:
                    self.server.hung_up.set()
                    return


@contextlib.contextmanager
def running(behaviour: str = "answer", models: str = "ok"):
    """A fake server on 127.0.0.1 (``server.url`` is its API base); stopped on exit, whatever happened."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.behaviour, server.models, server.requests = behaviour, models, []
    server.stopping, server.hung_up = threading.Event(), threading.Event()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, name="fake-llm", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
