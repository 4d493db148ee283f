"""A real HTTP webhook receiver for tests and the README walkthrough: records what it is sent."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """Listens on 127.0.0.1; `fail_first[path] = n` answers 503 to the first n posts on that path."""

    def __init__(self, port: int = 0) -> None:
        self.received: list[Received] = []
        self.fail_first: dict[str, int] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    remaining = receiver.fail_first.get(self.path, 0)
                    if remaining > 0:
                        receiver.fail_first[self.path] = remaining - 1
                        status = 503
                    else:
                        status = 204
                        receiver.received.append(
                            Received(
                                self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time()
                            )
                        )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return None

        # a burst of deliveries must not overflow the listen backlog (the default of 5 refuses connections)
        server_class = type(
            "Server", (ThreadingHTTPServer,), {"request_queue_size": 256, "daemon_threads": True}
        )
        self.server = server_class(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def on(self, path: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.path == path]
