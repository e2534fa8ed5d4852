"""Reading a JSON file from a folder the library may not have written (the Hub, a colleague, a shared disk).

Every JSON file a state, Spring or serving folder holds is read with [`read_json_capped`]: its size is checked with
`stat` before a byte is read, and at most `limit + 1` bytes are ever read (a file that grows after the check is still
refused), so a hostile file cannot make a load allocate more than its cap. Each cap is a module constant here, sized
far above what the library writes for realistic use and documented with the estimate it rests on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MIB = 2**20
# `continual_state.json`: about 100 bytes per user, so 128 MiB holds over a million users.
MAX_STATE_BYTES = 128 * MIB
# `training_args.json`: the fields that differ from their defaults, a few KiB.
MAX_TRAINING_ARGS_BYTES = 1 * MIB
# `spring_config.json`: about twenty scalar fields and two short templates.
MAX_SPRING_CONFIG_BYTES = 1 * MIB
# `base_logprobs.json`: about 100 bytes per scored interaction, so 512 MiB holds about five million.
MAX_BASE_LOGPROBS_BYTES = 512 * MIB
# `adapter_config.json` of a peft LoRA adapter: a few KiB (a long `target_modules` list at most).
MAX_ADAPTER_CONFIG_BYTES = 1 * MIB
# `serving_manifest.json` and `.lora_int_ids.json`: about 250 bytes per exported user.
MAX_SERVING_MANIFEST_BYTES = 64 * MIB


def read_json_capped(path: str | os.PathLike, limit: int, what: str | None = None) -> Any:
    """The parsed content of the JSON file `path`, refused when it is larger than `limit` bytes.

    Args:
        path (`str` or `os.PathLike`): the file.
        limit (`int`): the largest size accepted, in bytes (one of this module's `MAX_*` constants).
        what (`str`, *optional*): what the file is, for error messages (defaults to the path).

    Returns:
        The parsed JSON value (any JSON type: the caller checks its shape).

    Raises:
        `FileNotFoundError`: no such file. `ValueError`: the file is larger than `limit` (naming its size and the
        limit), not a regular file, not UTF-8, not valid JSON or nested too deeply to parse.
    """
    path = Path(path)
    what = what or str(path)
    size = path.stat().st_size  # stat follows a symlink, as open does: a Hub cache snapshot is made of symlinks
    if not path.is_file():
        raise ValueError(f"{what} is not a regular file; it is not read.")
    if size > limit:
        raise ValueError(f"{what} is {size} bytes, above the limit of {limit} bytes for this file; it is not read.")
    with open(path, "rb") as handle:
        raw = handle.read(limit + 1)  # never more than the cap, even if the file grew after the stat
    if len(raw) > limit:
        raise ValueError(f"{what} grew above the limit of {limit} bytes while being read; it is not read.")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} is not UTF-8 text: {err}.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be a file this library wrote.") from None
