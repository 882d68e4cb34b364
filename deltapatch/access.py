"""Access rules shared by every network-facing part (the stack's servers, the serving app, the plain
HTTP calls this package makes to Prefect): which bind addresses stay on this machine, and the
credentials header a Prefect client sends. Dependency-free, so that any module can import it."""

from __future__ import annotations

import base64
import ipaddress
import os


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; a host name other than localhost may resolve to anything."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def prefect_headers() -> dict[str, str]:
    """The Authorization header Prefect's own client sends for PREFECT_API_AUTH_STRING (none when unset),
    for this package's plain HTTP calls to the Prefect API."""
    auth_string = os.environ.get("PREFECT_API_AUTH_STRING", "")
    if not auth_string:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}
