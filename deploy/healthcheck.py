"""Container health check for a vein2vein service: exit 0 when GET /ready answers 200, else 1.

Used by docker-compose.yml (`python /app/deploy/healthcheck.py`); the image has no curl. The port is the
service's own V2V_HTTP_PORT; the path can be given as the first argument (default /ready).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/ready"
    port = os.environ.get("V2V_HTTP_PORT", "8000")
    url = f"http://127.0.0.1:{port}{path}"
    timeout = float(os.environ.get("V2V_HEALTHCHECK_TIMEOUT_S", "3"))
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # non-2xx raises HTTPError
            status = resp.status
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
