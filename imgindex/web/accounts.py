"""Users, roles and the audit trail of ``imgindex serve``, in ``ROOT/web/app.sqlite``.

- Three roles: ``researcher`` (explores the index, builds cohorts, requests exports),
  ``reviewer`` (approves or rejects export requests) and ``operator`` (watches throughput,
  backlog and failures). A user has one role.
- Passwords are stored as Argon2id hashes (argon2-cffi's defaults); a wrong name costs the
  same time as a wrong password.
- The audit table records who did what, when, to what, and which index version it saw. It is
  only ever appended to.

SQLite (in WAL mode) because the app's state is small, written a row at a time and read by
one server process; the index itself stays in Delta tables.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from imgindex.errors import ConfigError

if TYPE_CHECKING:
    import os
    from collections.abc import Iterator, Mapping

__all__ = ["ROLES", "Accounts", "AuditEntry", "User", "transaction"]

#: The roles, least to most operational.
ROLES: Final = ("researcher", "reviewer", "operator")
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_MIN_PASSWORD: Final = 8
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    user TEXT,
    action TEXT NOT NULL,
    target TEXT,
    detail TEXT,
    index_version TEXT
);
"""


@dataclass(frozen=True)
class User:
    """A signed-in user: name and role."""

    name: str
    role: str


@dataclass(frozen=True)
class AuditEntry:
    """One audit row."""

    id: int
    at: str
    user: str | None
    action: str
    target: str | None
    detail: dict[str, Any]
    index_version: str | None


class Accounts:
    """The users and audit trail of the app serving ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root) / "web" / "app.sqlite"
        self._hasher = PasswordHasher()
        # Verified against when the name is unknown, so both failures take as long.
        self._dummy = self._hasher.hash("no such user, no such password")

    def __repr__(self) -> str:
        return f"Accounts({str(self.path)!r})"

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with transaction(self.path, _SCHEMA) as con:
            yield con

    def add_user(self, name: str, role: str, password: str) -> User:
        """Add a user (or replace their role and password).

        Raises
        ------
        ConfigError
            For a name that is not ``[A-Za-z0-9._@-]`` (up to 64), an unknown role, or a
            password shorter than 8 characters.
        """
        if not _NAME.fullmatch(name):
            raise ConfigError(f"user names are letters, digits and . _ @ -, not {name!r}")
        if role not in ROLES:
            raise ConfigError(f"the roles are {', '.join(ROLES)}, not {role!r}")
        if len(password) < _MIN_PASSWORD:
            raise ConfigError(f"a password needs at least {_MIN_PASSWORD} characters")
        with self._db() as con:
            con.execute(
                "INSERT INTO users (name, role, password_hash, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET role = excluded.role, "
                "password_hash = excluded.password_hash",
                (name, role, self._hasher.hash(password), _now()),
            )
        return User(name, role)

    def remove_user(self, name: str) -> bool:
        """Remove a user; whether there was one."""
        with self._db() as con:
            return con.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

    def users(self) -> list[User]:
        """Every user, by name."""
        with self._db() as con:
            rows = con.execute("SELECT name, role FROM users ORDER BY name").fetchall()
        return [User(name, role) for name, role in rows]

    def user(self, name: str) -> User | None:
        """The user called ``name``, if any (their role as it is now)."""
        with self._db() as con:
            row = con.execute("SELECT name, role FROM users WHERE name = ?", (name,)).fetchone()
        return User(*row) if row else None

    def verify(self, name: str, password: str) -> User | None:
        """The user, if ``password`` is theirs; ``None`` otherwise (in the same time)."""
        with self._db() as con:
            row = con.execute(
                "SELECT name, role, password_hash FROM users WHERE name = ?", (name,)
            ).fetchone()
        stored = row[2] if row else self._dummy
        try:
            self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return User(row[0], row[1]) if row else None

    def audit(
        self,
        user: str | None,
        action: str,
        target: str | None = None,
        detail: Mapping[str, Any] | None = None,
        index_version: object = None,
    ) -> None:
        """Append one row to the audit trail."""
        with self._db() as con:
            con.execute(
                "INSERT INTO audit (at, user, action, target, detail, index_version) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    _now(),
                    user,
                    action,
                    target,
                    json.dumps(dict(detail or {}), default=str, sort_keys=True),
                    None if index_version is None else json.dumps(index_version, default=str),
                ),
            )

    def audit_trail(self, limit: int = 200) -> list[AuditEntry]:
        """The latest audit rows, newest first."""
        with self._db() as con:
            rows = con.execute(
                "SELECT id, at, user, action, target, detail, index_version FROM audit "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            AuditEntry(i, at, user, action, target, json.loads(detail or "{}"), version)
            for i, at, user, action, target, detail, version in rows
        ]


@contextlib.contextmanager
def transaction(path: Path, schema: str) -> Iterator[sqlite3.Connection]:
    """A connection to the app's SQLite file ``path`` (made owner-only, in WAL mode, with the
    tables of ``schema``), in one transaction committed on success, closed at the end."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    con = sqlite3.connect(path, timeout=10)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(schema)
        with con:
            yield con
    finally:
        con.close()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
