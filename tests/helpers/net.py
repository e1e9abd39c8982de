"""Ports and HTTP, for tests that talk to real servers."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str, token: str | None = None) -> int:
    """The status of a GET (with a bearer token when given); 0 when nothing answers."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def metric_sample(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus exposition (``/metrics``) with all of ``labels``; 0 when absent."""
    for line in text.splitlines():
        match = re.match(rf"^{name}{{(.*)}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    return 0.0
