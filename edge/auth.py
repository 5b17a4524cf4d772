"""Bearer tokens at the boundary: tenant scopes and a role, compared in constant time, never logged.

A tokens file (YAML or JSON; ``NOETL_TOKENS_FILE``)::

    tokens:
      - {name: ci, token: "…", tenants: [acme], role: write}
      - {name: ops, sha256: "<hex digest of the token>", tenants: ["*"], role: admin}

With no tokens configured, ``noetl-edge up`` creates an admin token at
``<data-dir>/token`` (mode 0600): the edge is never open by default.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from edge.errors import Forbidden, Unauthorized
from kernel.errors import ConfigError

Role = Literal["read", "write", "admin"]
RANK: dict[str, int] = {"read": 0, "write": 1, "admin": 2}


class TokenSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    role: Role
    tenants: tuple[str, ...]
    token: str | None = None
    sha256: str | None = None


class _TokensFile(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[TokenSpec]


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who a request is: a token's name, role and tenant scope (never the token itself)."""

    name: str
    role: Role
    tenants: frozenset[str]

    def allows(self, tenant: str) -> bool:
        return "*" in self.tenants or tenant in self.tenants


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class Authenticator:
    """Maps a bearer token to a :class:`Principal`; checks role and tenant per request.

    >>> auth = Authenticator([TokenSpec(name="a", role="read", tenants=("acme",), token="t0k")])
    >>> auth.check("Bearer t0k", tenant="acme", need="read").name
    'a'
    """

    def __init__(self, specs: list[TokenSpec]) -> None:
        self._entries: list[tuple[bytes, Principal]] = []
        for spec in specs:
            if (spec.token is None) == (spec.sha256 is None):
                raise ConfigError(f"token {spec.name!r}: give exactly one of 'token' or 'sha256'")
            try:
                digest = _digest(spec.token) if spec.token is not None else bytes.fromhex(spec.sha256 or "")
            except ValueError as e:
                raise ConfigError(f"token {spec.name!r}: sha256 must be 64 hex digits") from e
            if len(digest) != 32:
                raise ConfigError(f"token {spec.name!r}: sha256 must be 64 hex digits")
            if not spec.tenants:
                raise ConfigError(f"token {spec.name!r}: tenants must name at least one tenant or '*'")
            self._entries.append((digest, Principal(name=spec.name, role=spec.role, tenants=frozenset(spec.tenants))))
        if not self._entries:
            raise ConfigError("no API tokens configured: the edge never runs open (set NOETL_TOKENS_FILE)")

    def identify(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized("missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
        presented = _digest(token.strip())
        found: Principal | None = None
        # Compare against every entry, without an early exit, so timing says nothing about which matched.
        for digest, principal in self._entries:
            if hmac.compare_digest(presented, digest):
                found = principal
        if found is None:
            raise Unauthorized("invalid bearer token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return found

    def check(self, authorization: str | None, *, tenant: str | None, need: Role) -> Principal:
        principal = self.identify(authorization)
        if RANK[principal.role] < RANK[need]:
            raise Forbidden(f"token {principal.name!r} has role {principal.role!r}; this needs {need!r}")
        if tenant is not None and not principal.allows(tenant):
            raise Forbidden(f"token {principal.name!r} may not access tenant {tenant!r}")
        return principal


def load_tokens(env: Mapping[str, str] | None = None, *, data_dir: Path | None = None) -> list[TokenSpec]:
    """Tokens from ``NOETL_TOKENS_FILE``, else the admin token in ``<data-dir>/token`` if it exists."""
    env = os.environ if env is None else env
    path = env.get("NOETL_TOKENS_FILE")
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            return msgspec.convert(data, _TokensFile).tokens
        except OSError as e:
            raise ConfigError(f"cannot read NOETL_TOKENS_FILE {path!r}: {e.strerror}") from e
        except (yaml.YAMLError, msgspec.ValidationError) as e:
            raise ConfigError(f"bad tokens file {path}: {e}") from e
    if data_dir is not None and (data_dir / "token").exists():
        token = (data_dir / "token").read_text(encoding="utf-8").strip()
        return [TokenSpec(name="local-admin", role="admin", tenants=("*",), token=token)]
    return []


def ensure_admin_token(data_dir: Path) -> Path:
    """Create ``<data-dir>/token`` (mode 0600) with a fresh admin token unless it exists."""
    path = data_dir / "token"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path
