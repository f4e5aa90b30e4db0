"""fake_vllm: a small stand-in for a vLLM OpenAI server, for controller-only tests.

It speaks just enough of the API for the real OpenAI client and for HAProxy: GET /health,
GET /v1/models, GET /metrics (vllm:num_requests_running / waiting), POST /v1/chat/completions
(JSON or an SSE stream, chunked), and, like vLLM, an unguarded POST /pause. Every answer carries
`x-fake-backend: <name>` so tests can see which backend served a request. With `api_key` it answers
/v1/* without that bearer key with 401, as vLLM's --api-key does. It can be stopped and started
again on the same port, made unhealthy, slowed down, or told to fail requests.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # health checks hang up early: not an error here
        pass


class FakeVLLM:
    def __init__(self, name: str = "fake", model: str = "tiny-llama", port: int = 0, token_delay: float = 0.01,
                 tokens: int = 8, api_key: str = ""):
        self.name, self.model = name, model
        self.api_key = api_key
        self.paused = 0               # POST /pause calls that reached this backend
        self.auth_seen: list[str] = []  # Authorization headers of /v1 requests
        self.token_delay, self.tokens = token_delay, tokens
        self.healthy = True
        self.fail_status = 0          # answer chat completions with this HTTP status (0: serve normally)
        self.running = 0
        self.served = 0
        self.lock = threading.Lock()
        self.port = port or free_port()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeVLLM":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("x-fake-backend", fake.name)
                self.end_headers()
                self.wfile.write(body)

            def _unauthorized(self) -> bool:
                """vLLM's AuthenticationMiddleware: /v1 needs the key; other paths do not."""
                if not self.path.startswith("/v1"):
                    return False
                fake.auth_seen.append(self.headers.get("Authorization", ""))
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._send(401, b'{"error": "Unauthorized"}')
                    return True
                return False

            def do_GET(self):  # noqa: N802
                if self._unauthorized():
                    return
                if self.path == "/health":
                    self._send(200 if fake.healthy else 503, b"")
                elif self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [
                        {"id": fake.model, "object": "model", "created": 0, "owned_by": "vllm"}]}).encode())
                elif self.path == "/metrics":
                    text = (f'vllm:num_requests_running{{model_name="{fake.model}"}} {float(fake.running)}\n'
                            f'vllm:num_requests_waiting{{model_name="{fake.model}"}} 0.0\n')
                    self._send(200, text.encode(), "text/plain; version=0.0.4")
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self._unauthorized():
                    return
                if self.path == "/pause":
                    fake.paused += 1
                    self._send(200, b"{}")
                    return
                if self.path.startswith("/fake/restart"):
                    # Like an engine restart: stop listening for down_s seconds, then serve again.
                    down = float(body.get("down_s", 1.0))
                    self._send(200, b"{}")
                    threading.Thread(target=fake.restart, args=(down,), daemon=True).start()
                    return
                if self.path != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}')
                    return
                if fake.fail_status:
                    self._send(fake.fail_status, json.dumps({"error": {"message": "injected failure",
                                                                      "type": "fake"}}).encode())
                    return
                if body.get("model") != fake.model:
                    self._send(404, json.dumps({"error": {"message": f"model {body.get('model')} not found",
                                                          "type": "NotFoundError"}}).encode())
                    return
                with fake.lock:
                    fake.running += 1
                try:
                    n = min(int(body.get("max_tokens") or fake.tokens), fake.tokens)
                    if body.get("stream"):
                        self._stream(n)
                    else:
                        time.sleep(fake.token_delay * n)
                        self._send(200, json.dumps(completion(fake.model, "tok " * n, n)).encode())
                finally:
                    with fake.lock:
                        fake.running -= 1
                        fake.served += 1

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _stream(self, n: int) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("x-fake-backend", fake.name)
                self.end_headers()
                for i in range(n):
                    time.sleep(fake.token_delay)
                    delta = {"role": "assistant", "content": "tok "} if i == 0 else {"content": "tok "}
                    self._chunk(b"data: " + json.dumps(chunk(fake.model, delta, None)).encode() + b"\n\n")
                self._chunk(b"data: " + json.dumps(chunk(fake.model, {}, "length")).encode() + b"\n\n")
                self._chunk(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self._server = QuietServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                         daemon=True)
        self._thread.start()
        return self

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def completion(model: str, text: str, n: int) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n}}


def chunk(model: str, delta: dict, finish: str | None) -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
