"""Container health check: GET the worker's /api/status on loopback; exit 0 when it answers 200, else 1.

    python healthcheck.py [URL]      (default http://127.0.0.1:8765/api/status)

The live server (worker/live/http_server.py) asks every client for the token once one is set, loopback
clients included, so the token is sent as `Authorization: Bearer` when the worker has one: read from
WAN_HTTP_TOKEN_FILE (as the worker reads it: whitespace stripped), else WAN_HTTP_TOKEN. Without a token the
server only answers requests whose Host is a loopback address, which a request to 127.0.0.1 is.
Standard library only: it runs with the image's Python and needs no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8765/api/status"
TIMEOUT_S = 8.0


def token() -> str | None:
    """The worker's HTTP token from the same environment the worker reads, or None."""
    path = os.environ.get("WAN_HTTP_TOKEN_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read(4096).strip() or None
        except OSError:
            return None
    return os.environ.get("WAN_HTTP_TOKEN") or None


def check(url: str) -> int:
    """0 when `url` answers 200 within TIMEOUT_S, else 1 (the reason on stderr)."""
    request = urllib.request.Request(url)
    secret = token()
    if secret:
        request.add_header("Authorization", f"Bearer {secret}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(check(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_URL))
