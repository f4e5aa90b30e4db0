"""The exporter's listeners: HTTP (/metrics, /verdict) and the HAProxy agent-check port.

Both only read what the background jobs cached: a request never waits on a probe.
"""

from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
from typing import Callable, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

log = logging.getLogger(__name__)


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):  # one line per scrape would flood the journal
        pass


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def build_app(registry, verdict_body: Callable[[], Tuple[int, dict]] | None):
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/verdict":
            if verdict_body is None:
                status, doc = 404, {"error": "verdict not enabled on this host"}
            else:
                status, doc = verdict_body()
            body = json.dumps(doc).encode()
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            start_response(f"{status} {reason}", [("Content-Type", "application/json"),
                                                  ("Content-Length", str(len(body)))])
            return [body]
        return metrics(environ, start_response)
    return app


def start_http(addr: str, port: int, app) -> WSGIServer:
    class Server(_ThreadingWSGIServer):
        address_family = _family(addr)
    httpd = make_server(addr, port, app, Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="http", daemon=True).start()
    return httpd


class _AgentHandler(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            self.request.sendall(self.server.line().encode("ascii", "replace"))  # type: ignore
        except OSError:
            pass  # HAProxy gave up (agent timeout): it asks again next interval


def start_agent(addr: str, port: int, line: Callable[[], str]) -> socketserver.TCPServer:
    """HAProxy agent-check: on each connection, write one line (up / down #why) and close."""
    class Server(socketserver.ThreadingTCPServer):
        address_family = _family(addr)
        allow_reuse_address = True
        daemon_threads = True
    srv = Server((addr, port), _AgentHandler)
    srv.line = line  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, name="agent", daemon=True).start()
    return srv
