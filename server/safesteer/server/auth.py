"""API keys: a TOML file of hashed keys with scopes, and the principal a request acts as.

    [[keys]]
    name = "alice"
    sha256 = "<hex sha256 of the key>"
    scopes = ["client"]

Keys are random 256-bit tokens (`safesteer keys add` makes them), so one sha256 is the right
hash: there is nothing to brute-force. The file never holds a key itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Scope = Literal["client", "override", "admin"]
SCOPES: tuple[str, ...] = get_args(Scope)
KEY_PREFIX = "sk-ss-"


class KeysFileError(Exception):
    """The keys file is missing or malformed."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts as, and what it may do."""

    name: str
    scopes: frozenset[str]

    def can(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


LOCAL_PRINCIPAL = Principal("local", frozenset(SCOPES))


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyStore:
    """Hashed keys by hash; `authenticate` compares in constant time per entry."""

    entries: tuple[tuple[str, Principal], ...]

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise KeysFileError(f"keys file {path} does not exist") from exc
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise KeysFileError(f"keys file {path.name} is not readable TOML: {exc}") from exc
        entries: list[tuple[str, Principal]] = []
        for i, item in enumerate(raw.get("keys", [])):
            where = f"{path.name}: keys[{i}]"
            if not isinstance(item, dict) or set(item) - {"name", "sha256", "scopes"}:
                raise KeysFileError(f"{where}: expected name, sha256 and scopes")
            name, digest, scopes = item.get("name"), item.get("sha256"), item.get("scopes")
            if not isinstance(name, str) or not name:
                raise KeysFileError(f"{where}: name must be a non-empty string")
            if not isinstance(digest, str) or len(digest) != 64:
                raise KeysFileError(f"{where}: sha256 must be 64 hex digits")
            if not isinstance(scopes, list) or not scopes or set(scopes) - set(SCOPES):
                raise KeysFileError(f"{where}: scopes must be a non-empty subset of {SCOPES}")
            entries.append((digest.lower(), Principal(name, frozenset(scopes))))
        if not entries:
            raise KeysFileError(f"keys file {path.name} defines no keys")
        return cls(tuple(entries))

    def authenticate(self, key: str) -> Principal | None:
        digest = key_sha256(key)
        found: Principal | None = None
        for stored, principal in self.entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def add_key(path: Path, name: str, scopes: list[str]) -> str:
    """Append a new key entry to `path` (created if missing); returns the key, shown once."""
    if set(scopes) - set(SCOPES) or not scopes:
        raise KeysFileError(f"scopes must be a non-empty subset of {SCOPES}")
    if path.exists():
        existing = KeyStore.load(path)
        if any(p.name == name for _, p in existing.entries):
            raise KeysFileError(f"a key named {name!r} already exists in {path.name}")
    key = new_key()
    block = (
        "\n[[keys]]\n"
        f"name = {json.dumps(name)}\n"
        f'sha256 = "{key_sha256(key)}"\n'
        f"scopes = {json.dumps(sorted(set(scopes)))}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(block)
    path.chmod(0o600)
    return key
