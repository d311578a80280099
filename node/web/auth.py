"""Who may change things and see patient fields: admin login, API tokens, CSRF.

Three ways to authenticate, all checked against the settings (never a database of users):

- a browser logs in with ``web_admin_user`` / ``web_admin_password`` and gets a signed session
  cookie (HMAC-SHA256 with ``web_secret_key``; ``HttpOnly``, ``SameSite=Strict``);
- an API client sends ``Authorization: Bearer <token>`` with one of ``web_api_tokens``;
- or HTTP Basic with the admin credentials.

Anonymous callers may read states, counts and UIDs; they never see patient fields and every
mutating endpoint answers 401 (what else they may see: :mod:`node.web.access`). Wrong passwords
and tokens count towards a lockout per client address and user name (HTTP 429, :mod:`node.web.ratelimit`). Requests authenticated by cookie must also carry the CSRF token
(form field ``csrf_token`` or header ``X-CSRF-Token``), derived from a random per-browser cookie
(double submit, signed): a cross-site form cannot read it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Response, status

from node.web import ratelimit

log = logging.getLogger(__name__)

SESSION_COOKIE = "mednode_session"
CSRF_COOKIE = "mednode_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SESSION_TTL_S = 12 * 3600
#: Secrets that must never protect a node reachable from the network.
DEFAULT_SECRETS = frozenset({"", "change-me", "changeme", "secret", "mednode", "default"})


class WebConfigError(ValueError):
    """The web settings are unsafe for the address the dashboard is bound to."""


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AuthConfig:
    """The credentials of one node, read from the settings.

    ``admin_user``/``admin_password`` unset means nobody can log in (read-only dashboard).
    Without ``secret_key`` a random one is made per process: sessions end at restart.
    """

    admin_user: str | None
    admin_password: str | None
    secret_key: bytes
    api_tokens: tuple[str, ...]
    secret_is_ephemeral: bool

    @classmethod
    def from_settings(cls, settings: Any) -> AuthConfig:
        """Read ``web_admin_user``, ``web_admin_password``, ``web_secret_key``, ``web_api_tokens``.

        Raises
        ------
        WebConfigError
            When ``web_host`` is not a loopback address and the secret key is missing or a
            well-known default, or admin credentials are set without a password.
        """
        user = _secret_text(getattr(settings, "web_admin_user", None))
        password = _secret_text(getattr(settings, "web_admin_password", None))
        secret = _secret_text(getattr(settings, "web_secret_key", None))
        tokens_raw = getattr(settings, "web_api_tokens", None) or ()
        if isinstance(tokens_raw, str):
            tokens_raw = [t for t in tokens_raw.split(",")]
        tokens = tuple(t for t in (_secret_text(x) for x in tokens_raw) if t)
        host = str(getattr(settings, "web_host", "127.0.0.1"))
        if user and not password:
            raise WebConfigError("web_admin_user is set but web_admin_password is not: set both or neither")
        if not _is_loopback(host) and (secret is None or secret.strip().lower() in DEFAULT_SECRETS):
            raise WebConfigError(
                f"the dashboard is bound to {host}, not loopback: set web_secret_key "
                "(MEDNODE_WEB_SECRET_KEY) to a long random value, e.g. `python -c "
                "\"import secrets; print(secrets.token_urlsafe(32))\"`"
            )
        ephemeral = secret is None
        key = (secret or secrets.token_urlsafe(32)).encode()
        return cls(user, password, key, tokens, ephemeral)

    @property
    def login_enabled(self) -> bool:
        return bool(self.admin_user and self.admin_password)

    # -- credentials ----------------------------------------------------------------------------
    def check_password(self, user: str, password: str) -> bool:
        if not self.login_enabled:
            return False
        assert self.admin_user is not None and self.admin_password is not None
        ok_user = hmac.compare_digest(user.encode(), self.admin_user.encode())
        ok_password = hmac.compare_digest(password.encode(), self.admin_password.encode())
        return ok_user and ok_password

    def check_token(self, token: str) -> bool:
        return any(hmac.compare_digest(token.encode(), t.encode()) for t in self.api_tokens)

    # -- signed values --------------------------------------------------------------------------
    def _sign(self, payload: str) -> str:
        return hmac.new(self.secret_key, payload.encode(), hashlib.sha256).hexdigest()

    def make_session(self, user: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + SESSION_TTL_S)
        payload = f"{base64.urlsafe_b64encode(user.encode()).decode()}.{expires}"
        return f"{payload}.{self._sign('session|' + payload)}"

    def read_session(self, value: str | None, now: float | None = None) -> str | None:
        """The user of a valid, unexpired session cookie, else None."""
        if not value or value.count(".") != 2:
            return None
        encoded, expires, signature = value.split(".")
        payload = f"{encoded}.{expires}"
        if not hmac.compare_digest(signature, self._sign("session|" + payload)):
            return None
        try:
            if int(expires) < (now or time.time()):
                return None
            user = base64.urlsafe_b64decode(encoded.encode()).decode()
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        return user if self.login_enabled and user == self.admin_user else None

    def csrf_token(self, csrf_cookie: str) -> str:
        return self._sign("csrf|" + csrf_cookie)

    def check_csrf(self, csrf_cookie: str | None, token: str | None) -> bool:
        if not csrf_cookie or not token:
            return False
        return hmac.compare_digest(token, self.csrf_token(csrf_cookie))


def _secret_text(value: Any) -> str | None:
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)  # pydantic SecretStr
    text = str(getter() if callable(getter) else value)
    return text or None


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    user: str | None
    via: str  #: ``anonymous``, ``session``, ``token`` or ``basic``

    @property
    def is_admin(self) -> bool:
        return self.user is not None


ANONYMOUS = Principal(None, "anonymous")


def auth_config(request: Request) -> AuthConfig:
    config: AuthConfig = request.app.state.auth
    return config


# -- failed-login throttling (node.web.ratelimit) ----------------------------------------------
def client_address(request: Request) -> str:
    """The caller's address; ``X-Forwarded-For`` only from ``web_trusted_proxies``."""
    trusted: tuple[str, ...] = getattr(request.app.state, "trusted_proxies", ())
    peer = request.client.host if request.client else None
    return ratelimit.client_address(peer, request.headers.get("x-forwarded-for"), trusted)


def login_keys(request: Request, user: str | None) -> list[str]:
    """The limiter keys of one login attempt: its address and, when one is given, its user name."""
    keys = [f"ip:{client_address(request)}"]
    if user:
        keys.append(f"user:{user[:100]}")
    return keys


def _limiter(request: Request) -> ratelimit.LoginLimiter:
    limiter: ratelimit.LoginLimiter = request.app.state.login_limiter
    return limiter


def check_lockout(request: Request, user: str | None) -> None:
    """Refuse a login attempt while its address or user name is locked out.

    Raises
    ------
    HTTPException
        429 with ``Retry-After`` (seconds) during a lockout.
    """
    lockout = _limiter(request).locked(login_keys(request, user))
    if lockout is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"too many failed logins: try again in {lockout.retry_after_s} s",
            headers={"Retry-After": str(lockout.retry_after_s)},
        )


def login_failed(request: Request, user: str | None) -> None:
    """Count a failed login; audit and log each lockout it starts (never the password)."""
    from node import audit, context

    address = client_address(request)
    for started in _limiter(request).failure(login_keys(request, user)):
        if started.key.startswith("user:"):
            known = user is not None and user == auth_config(request).admin_user
            what = f"user name {user!r}" if known else "an unknown user name"
        else:
            what = f"address {address}"
        detail = (f"{started.failures} failed logins for {what}: locked out for {started.lockout_s:.0f} s "
                  f"(lockout {started.lockouts})")
        log.warning("failed logins from %s: %s", address, detail)
        try:
            audit.record(context.current().sessions, f"web:{address}", audit.LOGIN_LOCKED, None, detail)
        except Exception:  # boundary: the lockout holds even if the audit cannot be written
            log.exception("cannot write the audit row of a login lockout")


def login_succeeded(request: Request, user: str | None) -> None:
    _limiter(request).success(login_keys(request, user))


def current_principal(request: Request) -> Principal:
    """Who calls: a bearer token, HTTP Basic, a session cookie, or nobody.

    Wrong tokens and passwords count towards the failed-login lockout (429).
    """
    config = auth_config(request)
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials:
        check_lockout(request, None)
        if config.check_token(credentials.strip()):
            login_succeeded(request, None)
            request.state.principal = Principal("token", "token")
            return request.state.principal
        login_failed(request, None)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API token",
                            headers={"WWW-Authenticate": "Bearer"})
    if scheme.lower() == "basic" and credentials:
        try:
            user, _, password = base64.b64decode(credentials.strip()).decode().partition(":")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            user, password = "", ""
        check_lockout(request, user)
        if config.check_password(user, password):
            login_succeeded(request, user)
            request.state.principal = Principal(user, "basic")
            return request.state.principal
        login_failed(request, user)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid credentials",
                            headers={"WWW-Authenticate": "Basic"})
    principal = session_principal(request)
    request.state.principal = principal
    return principal


def session_principal(request: Request) -> Principal:
    """The caller by its session cookie alone (no password or token checked)."""
    session_user = auth_config(request).read_session(request.cookies.get(SESSION_COOKIE))
    if session_user is not None:
        return Principal(session_user, "session")
    return ANONYMOUS


PrincipalDep = Annotated[Principal, Depends(current_principal)]


async def require_admin(request: Request, principal: PrincipalDep) -> Principal:
    """Dependency of every mutating endpoint: 401 without login; cookie callers need CSRF."""
    if not principal.is_admin:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "log in first: POST /login (browser) or send Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if principal.via == "session":
        token = request.headers.get(CSRF_HEADER)
        if token is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            form = await request.form()
            value = form.get(CSRF_FIELD)
            token = value if isinstance(value, str) else None
        if not auth_config(request).check_csrf(request.cookies.get(CSRF_COOKIE), token):
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                "missing or invalid CSRF token: reload the page and try again")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


def ensure_csrf_cookie(request: Request, response: Response) -> str:
    """The CSRF token for forms on this page; sets the per-browser cookie when missing."""
    config = auth_config(request)
    cookie = request.cookies.get(CSRF_COOKIE)
    if not cookie:
        cookie = secrets.token_urlsafe(24)
        response.set_cookie(CSRF_COOKIE, cookie, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
    request.state.csrf_cookie = cookie
    return config.csrf_token(cookie)


def set_session(request: Request, response: Response, user: str) -> None:
    response.set_cookie(
        SESSION_COOKIE, auth_config(request).make_session(user), max_age=SESSION_TTL_S,
        httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/",
    )


def clear_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/")
