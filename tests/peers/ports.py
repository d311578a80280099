"""Free TCP ports and readiness checks on the loopback interface."""

from __future__ import annotations

import socket
import time

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    The port is found by binding port 0 and closing the socket again, so another process may
    take it before the caller does; start the server right away and treat a bind failure as
    a reason to pick a new port rather than as a test failure of the code under test.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int, host: str = LOOPBACK, timeout_s: float = 0.2) -> bool:
    """Return True if a TCP connection to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_port_closed(port: int, host: str = LOOPBACK, timeout_s: float = 10.0) -> bool:
    """Wait until nothing accepts on ``host:port``; return False if it still does at the end."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not port_accepts(port, host):
            return True
        time.sleep(0.05)
    return not port_accepts(port, host)
