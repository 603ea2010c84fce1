"""Container health check: exit 0 when the server answers GET /health on its port."""

import os
import sys
import urllib.request

port = os.environ.get("SAFESTEER_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as exc:
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
