"""API keys of `spring serve`: each key is bound to the users it may act for, or is an admin key.

The keys file (or the `SPRING_SERVE_API_KEYS` environment variable) holds JSON:

```json
{"keys": [{"key": "sk-alice-...", "users": ["alice"]}, {"key": "sk-ops-...", "admin": true}]}
```

A key bound to users may generate as, record for, read and erase only those users (and may call the base model
without `user`); an admin key may do all of it, and read `/metrics`. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_VAR = "SPRING_SERVE_API_KEYS"


@dataclass(frozen=True)
class ApiKey:
    """One key and what it may do."""

    key: str
    users: frozenset[str] = field(default_factory=frozenset)
    admin: bool = False

    def may_act_for(self, user: str) -> bool:
        return self.admin or user in self.users


class ApiKeys:
    """The server's keys.

    Args:
        keys (`list[ApiKey]`): at least one.
    """

    def __init__(self, keys: list[ApiKey]):
        if not keys:
            raise ValueError("the API keys list is empty.")
        self._keys = list(keys)

    def get(self, token: str) -> ApiKey | None:
        """The key `token` is, or None (every key is compared, in constant time)."""
        found = None
        for key in self._keys:
            if hmac.compare_digest(key.key.encode(), token.encode()):
                found = key
        return found

    @classmethod
    def parse(cls, text: str, where: str) -> ApiKeys:
        """Reads the JSON format of the module docstring; errors name `where` and the field."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{where} is not valid JSON ({err}).") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{where}: field 'keys' must be a list of {{'key', 'users' or 'admin'}} objects.")
        keys, seen = [], set()
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: keys[{i}] must be an object.")
            unknown = sorted(set(entry) - {"key", "users", "admin"})
            if unknown:
                raise ValueError(f"{where}: keys[{i}] has unknown field(s) {unknown}.")
            key = entry.get("key")
            if not isinstance(key, str) or len(key) < 16:
                raise ValueError(f"{where}: keys[{i}].key must be a string of at least 16 characters.")
            if key in seen:
                raise ValueError(f"{where}: keys[{i}].key is listed twice.")
            seen.add(key)
            users = entry.get("users", [])
            if not isinstance(users, list) or not all(isinstance(u, str) and u for u in users):
                raise ValueError(f"{where}: keys[{i}].users must be a list of user ids.")
            admin = entry.get("admin", False)
            if not isinstance(admin, bool):
                raise ValueError(f"{where}: keys[{i}].admin must be true or false.")
            if not users and not admin:
                raise ValueError(f"{where}: keys[{i}] is bound to no user and is not an admin key.")
            keys.append(ApiKey(key, frozenset(users), admin))
        return cls(keys)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> ApiKeys | None:
        """From `path`, else from the `SPRING_SERVE_API_KEYS` environment variable; None when neither is set."""
        if path is not None:
            return cls.parse(Path(path).read_text(encoding="utf-8"), str(path))
        text = os.environ.get(ENV_VAR)
        return cls.parse(text, ENV_VAR) if text else None
