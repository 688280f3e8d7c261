"""API keys: which tenant a key belongs to, and the keys file ``olmd keys`` manages.

A key is a secret the client sends as ``Authorization: Bearer <key>``. olmd keeps only
its SHA-256: the keys file (``[server] keys_file``, JSON, mode 0600) holds one entry per
key with its tenant, a short id to name it by, and when it was made. Keys from
``OLMD_API_KEYS`` (``tenant:key``) are hashed when the settings load. A lookup hashes the
presented key and compares digests with ``hmac.compare_digest``: what the timing of a
lookup depends on is a SHA-256 of the key, which tells nothing about any stored key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from daemon.atomicfile import write_atomic
from daemon.sections import TENANT_NAME
from daemon.settings import keys_file_problem

__all__ = ["KeyDirectory", "KeyEntry", "KeysFileError", "add_key", "read_keys", "revoke_keys"]

_KEY_PREFIX = "olmd-"


class KeysFileError(Exception):
    """The keys file cannot be used; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    id: str  # the first 12 hex digits of the hash: names a key in lists and revocations
    tenant: str
    sha256: str
    created: str


def digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def check_mode(path: Path) -> None:
    """Refuse a keys file that others can read (or that is missing)."""
    problem = keys_file_problem(path)
    if problem is not None:
        raise KeysFileError(problem)


def read_keys(path: Path) -> list[KeyEntry]:
    """The entries of a keys file, after checking its mode; KeysFileError otherwise."""
    check_mode(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = [KeyEntry(**item) for item in data["keys"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeysFileError(f"{path}: not a keys file ({exc})") from None
    for entry in entries:
        if not re.match(TENANT_NAME, entry.tenant) or len(entry.sha256) != 64:
            raise KeysFileError(f"{path}: entry {entry.id!r} is malformed")
    return entries


def _write(path: Path, entries: Iterable[KeyEntry]) -> None:
    body = {"keys": [asdict(e) for e in entries]}
    write_atomic(path, (json.dumps(body, indent=2) + "\n").encode(), mode=0o600)


def add_key(path: Path, tenant: str, now: dt.datetime | None = None) -> tuple[str, KeyEntry]:
    """A new key for ``tenant``: its hash goes into the file, the key itself is returned
    once and kept nowhere."""
    entries = read_keys(path) if path.exists() else []
    key = _KEY_PREFIX + secrets.token_urlsafe(32)
    hashed = hashlib.sha256(key.encode()).hexdigest()
    when = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0).isoformat()
    entry = KeyEntry(id=hashed[:12], tenant=tenant, sha256=hashed, created=when)
    _write(path, [*entries, entry])
    return key, entry


def revoke_keys(path: Path, tenant: str, key_id: str | None = None) -> list[KeyEntry]:
    """Remove ``tenant``'s keys (only ``key_id`` if given); the removed entries."""
    entries = read_keys(path)
    gone = [e for e in entries if e.tenant == tenant and (key_id is None or e.id == key_id)]
    if gone:
        _write(path, [e for e in entries if e not in gone])
    return gone


class KeyDirectory:
    """Key → tenant, from ``OLMD_API_KEYS`` and the keys file; only digests are kept."""

    def __init__(self, pairs: Iterable[tuple[str, str]], entries: Iterable[KeyEntry]) -> None:
        self._tenants: dict[bytes, tuple[bytes, str]] = {}
        for tenant, key in pairs:
            hashed = digest(key.encode())
            self._tenants[hashed] = (hashed, tenant)
        for entry in entries:
            hashed = bytes.fromhex(entry.sha256)
            self._tenants[hashed] = (hashed, entry.tenant)

    def __len__(self) -> int:
        return len(self._tenants)

    def tenant_of(self, key: bytes) -> str | None:
        presented = digest(key)
        found = self._tenants.get(presented)
        if found is None:
            return None
        stored, tenant = found  # the match, checked again in constant time
        return tenant if hmac.compare_digest(stored, presented) else None

    def tenants(self) -> Mapping[str, int]:
        """Keys per tenant (for /admin/usage: how many, never which)."""
        out: dict[str, int] = {}
        for _, tenant in self._tenants.values():
            out[tenant] = out.get(tenant, 0) + 1
        return out


def load_directory(pairs: Iterable[tuple[str, str]], keys_file: Path | None) -> KeyDirectory:
    entries = read_keys(keys_file) if keys_file is not None else []
    return KeyDirectory(pairs, entries)
