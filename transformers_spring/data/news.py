"""The HuffPost News Category dataset (LaMP-4's source) as per-author interaction streams."""

from __future__ import annotations

import json
from pathlib import Path

from ..memory.interaction import Interaction

# Where the project's shared checkout keeps the first 10,000 records (beside the repository).
DEFAULT_NEWS_PATH = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "news-category-v3"
    / "News_Category_Dataset_v3.first10000.jsonl"
)


def read_news_jsonl(path: str | Path = DEFAULT_NEWS_PATH, min_items: int = 1) -> list[Interaction]:
    """Reads News Category JSON Lines as interactions: user = `authors`, prompt = `short_description`,
    response = `headline`, timestamp = `date`. Records without an author or text are skipped.

    Args:
        path (`str` or `Path`): the `.jsonl` file (one news item per line).
        min_items (`int`, *optional*, defaults to 1): keep only authors with at least this many items.

    Returns:
        `list[Interaction]`, oldest first (ties keep file order).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"news file not found: {path}")
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path.name} line {number}: not valid JSON ({err}).") from err
            author = (row.get("authors") or "").strip()
            prompt, response = (row.get("short_description") or "").strip(), (row.get("headline") or "").strip()
            if not author or not prompt or not response:
                continue
            items.append(
                Interaction(
                    author,
                    prompt,
                    response,
                    timestamp=row["date"],
                    metadata={"category": row.get("category"), "link": row.get("link")},
                    id=f"news-{number}",
                )
            )
    counts: dict[str, int] = {}
    for item in items:
        counts[item.user_id] = counts.get(item.user_id, 0) + 1
    items = [item for item in items if counts[item.user_id] >= min_items]
    return sorted(items, key=lambda item: item.timestamp)
