"""Failed-login throttling: a lockout that grows, per client address and per user name.

After ``max_failures`` failed logins within ``window_s`` from one client address, or for one user
name, further attempts from that address or for that name are refused with HTTP 429 and a
``Retry-After`` until the lockout ends — even with the right password, or guessing would go on.
The first lockout lasts ``lockout_s``; each further one for the same key doubles, up to
``max_lockout_s``. A successful login clears the address and the user name.

The state is in this process's memory, which is enough: the dashboard and API run in one process
(``mednode serve`` starts one uvicorn worker). A restart forgets the failures. Distinct keys are
bounded (``max_keys``, the least recently seen dropped first) so a flood of addresses cannot grow
memory without end.

Client addresses come from the TCP peer. ``X-Forwarded-For`` is believed only when the peer is one
of ``trusted_proxies`` (``web_trusted_proxies``), and then only the entries that proxy added: the
right-most address that is not itself a trusted proxy.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass
class _Key:
    failures: list[float] = field(default_factory=list)
    locked_until: float = 0.0
    lockouts: int = 0
    last_seen: float = 0.0


@dataclass(frozen=True)
class Lockout:
    """A refusal: which key is locked and for how many more seconds."""

    key: str
    retry_after_s: int


@dataclass(frozen=True)
class NewLockout:
    """A lockout that a failure has just started (for the audit trail)."""

    key: str
    failures: int
    lockout_s: float
    lockouts: int


class LoginLimiter:
    """Counts failed logins per key (``ip:<address>``, ``user:<name>``) and locks keys out.

    Parameters
    ----------
    max_failures
        Failures within ``window_s`` that start a lockout.
    window_s
        How far back failures count.
    lockout_s, max_lockout_s
        Length of the first lockout of a key, and the cap of the doubling ones after it.
    clock
        Seconds, monotonic (tests pass their own).
    """

    def __init__(self, max_failures: int = 5, window_s: float = 300.0, lockout_s: float = 60.0,
                 max_lockout_s: float = 3600.0, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_failures < 1 or window_s <= 0 or lockout_s <= 0 or max_lockout_s < lockout_s:
            raise ValueError("login limits: need max_failures >= 1, window_s > 0 and "
                             "0 < lockout_s <= max_lockout_s")
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.max_lockout_s = max_lockout_s
        self.max_keys = max_keys
        self.clock = clock
        self._keys: OrderedDict[str, _Key] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, key: str, now: float) -> _Key:
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Key()
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        self._keys.move_to_end(key)
        entry.last_seen = now
        return entry

    def locked(self, keys: Iterable[str]) -> Lockout | None:
        """The longest lockout among ``keys`` now in force, else None."""
        now = self.clock()
        worst: Lockout | None = None
        with self._lock:
            for key in keys:
                entry = self._keys.get(key)
                if entry is None or entry.locked_until <= now:
                    continue
                remaining = max(1, math.ceil(entry.locked_until - now))
                if worst is None or remaining > worst.retry_after_s:
                    worst = Lockout(key, remaining)
        return worst

    def failure(self, keys: Iterable[str]) -> list[NewLockout]:
        """Count one failed login against each key; return the lockouts it started."""
        now = self.clock()
        started = []
        with self._lock:
            for key in keys:
                entry = self._get(key, now)
                entry.failures = [t for t in entry.failures if t > now - self.window_s] + [now]
                if len(entry.failures) >= self.max_failures and entry.locked_until <= now:
                    entry.lockouts += 1
                    length = min(self.max_lockout_s, self.lockout_s * 2 ** (entry.lockouts - 1))
                    entry.locked_until = now + length
                    started.append(NewLockout(key, len(entry.failures), length, entry.lockouts))
                    entry.failures = []
        return started

    def success(self, keys: Iterable[str]) -> None:
        """A successful login: forget the failures and lockouts of ``keys``."""
        with self._lock:
            for key in keys:
                self._keys.pop(key, None)


def client_address(peer: str | None, forwarded_for: str | None, trusted_proxies: Iterable[str]) -> str:
    """The address a request came from, believing ``X-Forwarded-For`` only from trusted proxies."""
    networks = []
    for entry in trusted_proxies:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            continue

    def trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in n for n in networks)

    address = peer or "unknown"
    if not forwarded_for or not trusted(address):
        return address
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        address = hop
        if not trusted(hop):
            break
    return address
