"""An S3-compatible server (moto) on loopback that behaves like object storage at a
distance: every request waits ``delay_s`` before it is served, and every request is
counted by kind. Used by the scale tests (request counts) and ``bench/scale_curve.py``
(wall time at 20 ms a request). Requests are served on threads of their own, so
requests in flight overlap as they would against a real store.

    with SlowS3(delay_s=0.02) as s3:
        env = s3.env()          # AWS_* variables for catkd subprocesses
        s3.reset(); ...; s3.counts()   # {"GET": n, "LIST": n, "PUT": n, "HEAD": n, ...}
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs

KEY, SECRET = "catkd-test", "catkd-test-secret-never-logged"


def request_kind(method: str, path: str, query: str) -> str:
    """LIST for a bucket listing, else the HTTP method (GET, HEAD, PUT, POST, DELETE)."""
    params = parse_qs(query, keep_blank_values=True)
    key = path.lstrip("/").partition("/")[2]
    if method == "GET" and (not key or "list-type" in params or "prefix" in params or "delimiter" in params):
        return "LIST"
    return method


class SlowS3:
    """moto's S3 on 127.0.0.1, each request delayed and counted."""

    def __init__(self, delay_s: float = 0.02) -> None:
        self.delay_s = delay_s
        self._counts: Counter[str] = Counter()
        self._by_name: Counter[tuple[str, str]] = Counter()  # (kind, last part of the key)
        self._lock = threading.Lock()
        self._in_flight = 0
        self.peak_in_flight = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def _app(self, inner):
        def app(environ, start_response):
            path = environ.get("PATH_INFO", "")
            kind = request_kind(environ["REQUEST_METHOD"], path, environ.get("QUERY_STRING", ""))
            with self._lock:
                self._counts[kind] += 1
                self._by_name[kind, path.rstrip("/").rsplit("/", 1)[-1]] += 1
                self._in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            try:
                if self.delay_s > 0:
                    time.sleep(self.delay_s)
                return inner(environ, start_response)
            finally:
                with self._lock:
                    self._in_flight -= 1

        return app

    def start(self) -> SlowS3:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        app = self._app(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._thread.join()
            self._server = None

    def __enter__(self) -> SlowS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto/s3fs (in this process or a child) here."""
        return {
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def filesystem(self):
        """An s3fs filesystem of its own (no instance shared with catkd's code)."""
        import s3fs

        return s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.endpoint, skip_instance_cache=True)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._by_name.clear()
            self.peak_in_flight = 0

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def count_of(self, kind: str, name: str) -> int:
        """Requests of ``kind`` for keys whose last part is ``name`` (``manifest.json``)."""
        with self._lock:
            return self._by_name[kind, name]
