"""DICOM TLS (PS3.15 B.1, BCP 195): the listener's server context and the client context of a
destination.

TLS 1.2 is the minimum (BCP 195 and the Non-Downgrading BCP 195 profile of PS3.15 B.9 forbid
anything older). With ``require_client_cert`` a peer must present a certificate signed by
``ca_file`` (mutual authentication, the usual setup between a modality or PACS and a node);
with ``ca_file`` alone a certificate is verified when a peer offers one.
"""

from __future__ import annotations

import ssl

from node.config import (
    ConfigError,
    Destination,
    DestinationTLS,
    DicomWebDestination,
    Settings,
    TLSSettings,
)


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The ``ssl.SSLContext`` of the DICOM TLS listener.

    Raises
    ------
    ConfigError
        If a certificate, key or CA file is missing or unreadable, or the key does not match
        the certificate; the message names the ``tls.*`` key.
    """
    for key, path in (("tls.cert_file", tls.cert_file), ("tls.key_file", tls.key_file),
                      ("tls.ca_file", tls.ca_file)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}: file not found: {path}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"tls.cert_file/tls.key_file: cannot load {tls.cert_file} with {tls.key_file} "
            f"(PEM certificate and its unencrypted private key expected): {exc}"
        ) from None
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls.ca_file: cannot load CA certificates from {tls.ca_file}: {exc}") from None
    if tls.require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_file is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: DestinationTLS, *, key: str = "tls") -> ssl.SSLContext:
    """The ``ssl.SSLContext`` to send to one destination over DICOM TLS.

    TLS 1.2 at least; the peer's certificate must chain to ``ca_file`` and match the host name
    (``check_hostname``), as a browser would check it. ``key`` names the setting in messages,
    e.g. ``destinations.pacs.tls``.

    Raises
    ------
    ConfigError
        If ``ca_file``, ``cert_file`` or ``key_file`` is missing or unreadable, or the key does not
        match the certificate.
    """
    for name, path in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file), ("key_file", tls.key_file)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}.{name}: file not found: {path}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_verify_locations(cafile=str(tls.ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{key}.ca_file: cannot load CA certificates from {tls.ca_file}: {exc}") from None
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            context.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{key}.cert_file/{key}.key_file: cannot load {tls.cert_file} with {tls.key_file} "
                f"(PEM certificate and its unencrypted private key expected): {exc}"
            ) from None
    return context


def check_destination_tls(settings: Settings) -> None:
    """Load the TLS files of every destination once, so ``serve`` refuses to start without them.

    Raises
    ------
    ConfigError
        If a destination's TLS file is missing or unreadable; the message names its key, e.g.
        ``destinations.pacs.tls.ca_file``.
    """
    named = [("destination", settings.destination), *((f"destinations.{n}", d) for n, d in settings.destinations.items())]
    for key, destination in named:
        if isinstance(destination, Destination) and destination.tls is not None:
            client_context(destination.tls, key=f"{key}.tls")
        elif isinstance(destination, DicomWebDestination) and destination.dicomweb.ca_file is not None \
                and not destination.dicomweb.ca_file.is_file():
            raise ConfigError(f"{key}.dicomweb.ca_file: file not found: {destination.dicomweb.ca_file}")
