"""Request authentication: the API key in `Authorization: Bearer ...` names a principal.

With no keys file the server runs in local mode: every request acts as the local principal
with every scope (the CLI refuses to bind such a server to a non-loopback address).
"""

from __future__ import annotations

import ipaddress

from fastapi import Request

from safesteer.server.auth import LOCAL_PRINCIPAL, KeyStore, Principal
from safesteer.server.errors import AuthenticationFailed, PermissionDenied


def authenticate(request: Request) -> Principal:
    """FastAPI dependency: the principal of this request, or 401."""
    keys: KeyStore | None = request.app.state.keys
    if keys is None:
        return LOCAL_PRINCIPAL
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed(
            "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key"
        )
    principal = keys.authenticate(token.strip())
    if principal is None:
        raise AuthenticationFailed("incorrect API key provided")
    return principal


def require_admin(request: Request) -> Principal:
    """FastAPI dependency: the principal, which must hold the `admin` scope (else 403)."""
    principal = authenticate(request)
    if "admin" not in principal.scopes:
        raise PermissionDenied("this endpoint needs an API key with the 'admin' scope")
    return principal


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
