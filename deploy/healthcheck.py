"""`python -m deploy.healthcheck TARGET...`: exit 0 when every target answers.

For container healthchecks: the tally image is python:3.11-slim, which has no
curl or wget, and the worker and the sink serve no HTTP. A target is
`http(s)://host:port/path` (answers 2xx) or `tcp://host:port[,host:port...]`
(one of the addresses accepts a connection, as a Kafka bootstrap list does).
"""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from urllib.parse import urlparse


def check(target: str, timeout_s: float = 3.0) -> str | None:
    """None when `target` answers, else what went wrong."""
    parsed = urlparse(target)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(target, timeout=timeout_s) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            return f"{target} answered {exc.code}"
        except (OSError, ValueError) as exc:
            return f"{target} did not answer: {exc}"
        return None if 200 <= status < 300 else f"{target} answered {status}"
    if parsed.scheme == "tcp":
        problems = []
        for address in target.removeprefix("tcp://").split(","):
            host, _, port = address.strip().rpartition(":")
            if not host or not port.isdigit():
                return f"{address!r} is not host:port"
            try:
                with socket.create_connection((host, int(port)), timeout=timeout_s):
                    return None
            except OSError as exc:
                problems.append(f"{address}: {exc}")
        return "no address accepts connections (" + "; ".join(problems) + ")"
    return f"{target!r}: use http(s)://host:port/path or tcp://host:port[,host:port]"


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m deploy.healthcheck TARGET...", file=sys.stderr)
        return 2
    problems = [p for p in (check(target) for target in argv) if p is not None]
    for problem in problems:
        print(f"unhealthy: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
