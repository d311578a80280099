"""Who may associate with the listener, and over what: the calling AE allow-list and DICOM TLS.

Pure configuration checks with no metrics, index or store behind them, so ``mednode serve`` can
refuse unusable settings before it touches the data directory (:func:`node.cli.serve`).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from node.config import ConfigError, Settings

log = logging.getLogger(__name__)


def _normal_ip(address: str) -> str:
    """The canonical text of an IP address (an IPv4-mapped IPv6 address as plain IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0].strip("[]"))
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _resolve(host: str) -> frozenset[str]:
    """The IP addresses ``host`` stands for (itself when it is an address), empty if unresolvable."""
    if _is_ip(host):
        return frozenset({_normal_ip(host)})
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("allowed_calling_ae_titles: cannot resolve host %r (%s); its entries allow "
                    "no peer until the next start", host, exc)
        return frozenset()
    return frozenset(_normal_ip(str(info[4][0])) for info in infos)


@dataclass(frozen=True)
class AllowedPeer:
    """One allow-list entry: a calling AE title, from any host or from one host's addresses."""

    ae_title: str
    host: str | None = None
    addresses: frozenset[str] = field(default_factory=frozenset)

    def allows(self, ae_title: str, address: str) -> bool:
        if ae_title != self.ae_title:
            return False
        return self.host is None or _normal_ip(address) in self.addresses


@dataclass(frozen=True)
class CallingAEAllowList:
    """The peers allowed to associate (``allowed_calling_ae_titles``).

    AE titles compare exactly after stripping spaces (PS3.5 6.2: leading and trailing spaces
    are not significant; titles are case-sensitive). A host name is resolved once, when the
    list is built (at start), so a peer is checked by IP without a DNS lookup per association.
    """

    peers: tuple[AllowedPeer, ...]

    @classmethod
    def parse(cls, entries: Sequence[str]) -> CallingAEAllowList:
        """Build the list from ``AET`` / ``AET@host`` entries.

        Raises
        ------
        ConfigError
            If an entry has an empty or invalid AE title (1–16 printable characters, no
            backslash) or an empty host.
        """
        peers = []
        for entry in entries:
            title, sep, host = str(entry).strip().partition("@")
            title, host = title.strip(), host.strip()
            if not 1 <= len(title) <= 16 or "\\" in title or not title.isprintable():
                raise ConfigError(
                    f"allowed_calling_ae_titles: {entry!r} is not AET or AET@host "
                    "(an AE title has 1 to 16 printable characters and no backslash)"
                )
            if sep and not host:
                raise ConfigError(f"allowed_calling_ae_titles: {entry!r} has '@' but no host")
            peers.append(AllowedPeer(title, host or None, _resolve(host) if host else frozenset()))
        return cls(tuple(peers))

    def allows(self, ae_title: str | None, address: str) -> bool:
        title = (ae_title or "").strip()
        return any(peer.allows(title, address) for peer in self.peers)


@dataclass(frozen=True)
class ListenerSecurity:
    """Who may associate and the DICOM TLS context, checked before anything starts."""

    allowed: CallingAEAllowList | None
    ssl_context: ssl.SSLContext | None

    @classmethod
    def from_settings(cls, settings: Settings) -> ListenerSecurity:
        """Parse ``allowed_calling_ae_titles`` and load the ``tls`` files.

        Raises
        ------
        ConfigError
            If an allow-list entry is invalid or a TLS file cannot be loaded.
        """
        from node.tls import server_context

        allowed = (CallingAEAllowList.parse(settings.allowed_calling_ae_titles)
                   if settings.allowed_calling_ae_titles is not None else None)
        return cls(allowed, server_context(settings.tls) if settings.tls is not None else None)
