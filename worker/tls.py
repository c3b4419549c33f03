"""TLS on the worker's own port: the stock `ssl` field, honoured.

`"ssl": true` with `"ssl_certfile"` and `"ssl_keyfile"` (or env FN_SUPERVISE_SSL_CERTFILE /
FN_SUPERVISE_SSL_KEYFILE) serves the WebSocket and every HTTP route over TLS on the same port.
The supervisor holds only the TCP socket; each worker (forked or spawned) builds its context
from the config, so a restart carries TLS like everything else. The supervisor calls
`config_error` before it launches anything: a missing or unreadable certificate is a clear
configuration error at start, never a crash loop. Stdlib only (the supervisor imports it too).
"""

from __future__ import annotations

import os
import ssl
from typing import Any, Mapping

from .config import ConfigError


class TLSConfigError(ConfigError):
    """The config asks for TLS and it cannot be had."""


def enabled(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("ssl") is True


def files(cfg: Mapping[str, Any]) -> tuple[str, str]:
    cert = cfg.get("ssl_certfile") or os.environ.get("FN_SUPERVISE_SSL_CERTFILE") or ""
    key = cfg.get("ssl_keyfile") or os.environ.get("FN_SUPERVISE_SSL_KEYFILE") or cert  # a combined PEM
    return str(cert), str(key)


def server_context(cfg: Mapping[str, Any]) -> ssl.SSLContext | None:
    """The context to serve with, None when TLS is off; TLSConfigError says what is wrong."""
    if not enabled(cfg):
        return None
    cert, key = files(cfg)
    if not cert:
        raise TLSConfigError('"ssl": true needs "ssl_certfile" and "ssl_keyfile" '
                             "(or FN_SUPERVISE_SSL_CERTFILE / FN_SUPERVISE_SSL_KEYFILE)")
    for what, path in (("ssl_certfile", cert), ("ssl_keyfile", key)):
        if not os.path.isfile(path):
            raise TLSConfigError(f"{what} {path} does not exist or is not a file")
        if not os.access(path, os.R_OK):
            raise TLSConfigError(f"{what} {path} is not readable by this user")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as e:
        raise TLSConfigError(f"cannot load the certificate {cert} with key {key}: {e}") from None
    return ctx


def config_error(cfg: Mapping[str, Any]) -> str | None:
    try:
        server_context(cfg)
    except TLSConfigError as e:
        return str(e)
    return None


def scheme(cfg: Mapping[str, Any], ws: bool = True) -> str:
    return ("wss" if ws else "https") if enabled(cfg) else ("ws" if ws else "http")
