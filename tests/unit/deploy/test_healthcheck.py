from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from deploy.healthcheck import check, main


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    httpd = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_http_target_must_answer_2xx(server: int) -> None:
    assert check(f"http://127.0.0.1:{server}/healthz") is None
    assert "answered 503" in (check(f"http://127.0.0.1:{server}/readyz") or "")
    assert "did not answer" in (check(f"http://127.0.0.1:{_closed_port()}/healthz") or "")


def test_tcp_target_needs_one_address_that_accepts(server: int) -> None:
    closed = _closed_port()
    assert check(f"tcp://127.0.0.1:{closed},127.0.0.1:{server}") is None
    assert "no address accepts" in (check(f"tcp://127.0.0.1:{closed}") or "")
    assert "not host:port" in (check("tcp://kafka") or "")


def test_exit_status(server: int) -> None:
    assert main([f"http://127.0.0.1:{server}/healthz"]) == 0
    assert main([f"http://127.0.0.1:{server}/healthz", f"tcp://127.0.0.1:{_closed_port()}"]) == 1
    assert main(["ftp://x"]) == 1
    assert main([]) == 2
