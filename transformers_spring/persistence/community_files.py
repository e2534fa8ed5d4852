"""`community_adapters.json`: the routing table of a SPRInG folder's community adapters (see
[`~generation.community.CommunityAdapters`]), next to `spring_config.json`. The adapters' weights are ordinary peft
folders under `adapters/`; this file says which of them are community adapters, who contributed to each, and where
each sits in embedding space. Read from folders the library may not have written: every field is checked, and the
file is capped in size before it is parsed.

Nothing from `transformers_spring.generation` is imported at module import time: `generation` imports this module.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .json_files import MIB, read_json_capped

if TYPE_CHECKING:
    from ..generation.community import CommunityAdapters

COMMUNITY_FILE = "community_adapters.json"
FORMAT_VERSION = 1
# A centroid is at most 8,192 floats (~20 bytes each in JSON) and a member id at most a few hundred bytes: 64 MiB holds
# hundreds of communities of thousands of members.
MAX_COMMUNITY_BYTES = 64 * MIB
MAX_DIM = 8192


def write_community_adapters(directory: str | os.PathLike, communities: CommunityAdapters) -> None:
    """Writes `community_adapters.json` into `directory` (a save's staging folder)."""
    data = {
        "format_version": FORMAT_VERSION,
        "min_users": communities.min_users,
        "min_similarity": communities.min_similarity,
        "max_items_per_user": communities.max_items_per_user,
        "adapters": [
            {
                "name": a.name,
                "members": list(a.members),
                "num_items": int(a.num_items),
                "initialized": list(a.initialized),
                "centroid": [float(v) for v in a.centroid],
            }
            for a in communities
        ],  # fmt: skip
    }
    Path(directory, COMMUNITY_FILE).write_text(json.dumps(data), encoding="utf-8")


def read_community_adapters(directory: str | os.PathLike, adapters: Any = None) -> CommunityAdapters | None:
    """The routing table of `directory`, or None when it has no `community_adapters.json`.

    Args:
        directory (`str` or `os.PathLike`): the SPRInG folder.
        adapters (`Collection[str]`, *optional*): the adapter names the folder's `adapters/` holds; each community
            adapter must be one of them.

    Raises:
        `ValueError`: a malformed file, naming the field.
    """
    from ..generation.adapters import sanitize_adapter_name
    from ..generation.community import COMMUNITY_ADAPTER_PREFIX, CommunityAdapter, CommunityAdapters
    from ..records import check_user_id

    path = Path(directory, COMMUNITY_FILE)
    if not os.path.lexists(path):
        return None
    if path.is_symlink():
        raise ValueError(f"{path} is a symlink; it is not read.")
    data = read_json_capped(path, MAX_COMMUNITY_BYTES, what=str(path))
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: field 'format_version' must be {FORMAT_VERSION}.")
    entries = data.get("adapters")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: field 'adapters' must be a list.")
    built, dim = [], None
    for i, entry in enumerate(entries):
        where = f"{path}: field 'adapters[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}' must be an object.")
        name = entry.get("name")
        if (
            not isinstance(name, str)
            or not name.startswith(COMMUNITY_ADAPTER_PREFIX)
            or name != sanitize_adapter_name(name)
        ):
            raise ValueError(f"{where}.name' must be a community adapter name ({COMMUNITY_ADAPTER_PREFIX}<n>).")
        if adapters is not None and name not in adapters:
            raise ValueError(f"{where}.name': the folder has no adapter {name!r}.")
        members, initialized = entry.get("members"), entry.get("initialized", [])
        if not isinstance(members, list) or not members:
            raise ValueError(f"{where}.members' must be a non-empty list of user ids.")
        for field, users in (("members", members), ("initialized", initialized)):
            if not isinstance(users, list):
                raise ValueError(f"{where}.{field}' must be a list of user ids.")
            try:
                users = [check_user_id(m) for m in users]
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where}.{field}': {err}") from None
            if len(set(users)) != len(users):
                raise ValueError(f"{where}.{field}' repeats a user.")
        count = entry.get("num_items")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{where}.num_items' must be a non-negative int.")
        centroid = entry.get("centroid")
        numbers = isinstance(centroid, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in centroid
        )
        if not numbers or not 1 <= len(centroid) <= MAX_DIM or (dim is not None and len(centroid) != dim):
            raise ValueError(f"{where}.centroid' must be a list of finite numbers of one length (at most {MAX_DIM}).")
        dim = len(centroid)
        built.append(CommunityAdapter(name, members, centroid, count, initialized))
    if len({a.name for a in built}) != len(built):
        raise ValueError(f"{path}: field 'adapters' names an adapter twice.")
    try:
        return CommunityAdapters(
            data.get("min_users", 3), data.get("min_similarity", 0.0), built,
            max_items_per_user=data.get("max_items_per_user", 64),
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
