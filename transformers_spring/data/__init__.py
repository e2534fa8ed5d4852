"""Data: loaders that turn datasets into [`Interaction`] streams."""

from .news import DEFAULT_NEWS_PATH, read_news_jsonl

__all__ = ["DEFAULT_NEWS_PATH", "read_news_jsonl"]
