"""Data: loaders that turn datasets into [`Interaction`] streams."""

from .news import DEFAULT_NEWS_PATH, read_news_jsonl
from .streams import group_by_user

__all__ = ["DEFAULT_NEWS_PATH", "group_by_user", "read_news_jsonl"]
