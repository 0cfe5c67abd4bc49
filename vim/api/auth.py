"""Bearer tokens and the per-RPC authorisation policy.

A call carries `authorization: Bearer <JWT>`. The token is verified (HS256 with
the cluster's shared secret; `exp` required) and names the user (`sub`), the
tenant (`tenant`) and the roles (`roles`: admin, member, reader). Each RPC has a
policy, the set of roles that may call it:

- READ: reader, member, admin (queries, watches);
- WRITE: member, admin (a tenant's own resources);
- ADMIN: admin only (hosts, quotas, flavours, images' public visibility, rebuilds).
- AGENT: a compute agent (role "agent", subject "agent:<hostname>", minted by
  `mint_agent`); it may call only the Agents service, and only about its own
  host (`agent_hostname`), which the servicer checks.

No token, a malformed, expired or badly signed one: UNAUTHENTICATED. A valid
token without an allowed role: PERMISSION_DENIED. Another tenant's resources are
not hidden here but by the servicers, which answer NOT_FOUND for them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from vim.app.commands import Principal
from vim.errors import PermissionDenied, Unauthenticated

READ = frozenset({"reader", "member", "admin"})
WRITE = frozenset({"member", "admin"})
ADMIN = frozenset({"admin"})
AGENT = frozenset({"agent"})
ROLES = READ | AGENT
AGENT_SUBJECT_PREFIX = "agent:"
ALGORITHM = "HS256"


@dataclass(frozen=True, slots=True)
class Authenticator:
    """Verifies bearer tokens against the cluster's shared secret."""

    secret: bytes
    leeway_s: float = 5.0

    def __post_init__(self) -> None:
        if len(self.secret) < 32:
            raise ValueError("the token secret must be at least 32 bytes")

    def principal(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal:
        """The caller named by the call's bearer token; raises Unauthenticated."""
        token = _bearer(metadata)
        return _verify(self.secret, self.leeway_s, token)

    def mint(self, user: str, tenant: str, roles: Sequence[str], *, ttl_s: float = 3600.0) -> str:
        """A signed token (for tests, the demo and `vimctl`'s operators)."""
        now = int(time.time())
        claims = {
            "sub": user,
            "tenant": tenant,
            "roles": list(roles),
            "iat": now,
            "exp": now + int(ttl_s),
        }
        return jwt.encode(claims, self.secret, algorithm=ALGORITHM)

    def mint_agent(self, hostname: str, *, ttl_s: float = 3600.0) -> str:
        """A token for the compute agent of `hostname` (role agent, nothing else)."""
        return self.mint(
            f"{AGENT_SUBJECT_PREFIX}{hostname}", f"host-{hostname}", ["agent"], ttl_s=ttl_s
        )


def agent_hostname(principal: Principal) -> str:
    """The host an agent's token names; PermissionDenied for any other caller."""
    name = principal.user.removeprefix(AGENT_SUBJECT_PREFIX)
    if "agent" not in principal.roles or name == principal.user or not name:
        raise PermissionDenied(f"{principal.user} is not a compute agent")
    return name


def authorize(principal: Principal, allowed: frozenset[str], method: str) -> None:
    if not principal.roles & allowed:
        raise PermissionDenied(
            f"{method} needs one of the roles {sorted(allowed)}; "
            f"{principal.user} has {sorted(principal.roles)}"
        )


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token:
                return token.strip()
            raise Unauthenticated("the authorization header must be 'Bearer <token>'")
    raise Unauthenticated("missing bearer token (authorization metadata)")


@functools.lru_cache(maxsize=4096)
def _claims(secret: bytes, leeway_s: float, token: str) -> tuple[Principal, int]:
    """The caller a token names and its expiry, cached by the raw token: a client
    sends the same token on every call, and verifying it (base64, JSON, HMAC) was a
    measurable part of a call. Only valid tokens are cached (a refused one raises);
    the expiry is checked on every call by `_verify`, not here."""
    try:
        c = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            leeway=leeway_s,
            options={"require": ["exp", "sub"]},
        )
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"invalid bearer token: {exc}") from None
    roles = c.get("roles", [])
    tenant = c.get("tenant")
    if not isinstance(tenant, str) or not tenant or not isinstance(roles, list):
        raise Unauthenticated("the token must name a tenant and a list of roles")
    principal = Principal(
        user=str(c["sub"]), tenant=tenant, roles=frozenset(r for r in roles if r in ROLES)
    )
    return principal, int(c["exp"])


def _verify(secret: bytes, leeway_s: float, token: str) -> Principal:
    principal, exp = _claims(secret, leeway_s, token)
    if exp + leeway_s < time.time():  # a cached token can expire after it was cached
        # Refused on every call; it stays cached (and ages out of the LRU): clearing
        # the whole cache here would let one expired token force every caller's
        # token to be verified again.
        raise Unauthenticated("invalid bearer token: Signature has expired")
    return principal
