"""Data: loaders that turn datasets into [`Interaction`] streams, and the temporal protocol that splits them."""

from .jsonl import read_interactions_jsonl, write_interactions_jsonl
from .lamp import TASK_PRESETS, read_lamp
from .news import DEFAULT_NEWS_PATH, NEWS_SUBSET_PATH, convert_news_category, read_news_jsonl
from .protocol import PeriodSplit, select_users, temporal_split
from .streams import group_by_user

__all__ = [
    "DEFAULT_NEWS_PATH",
    "NEWS_SUBSET_PATH",
    "TASK_PRESETS",
    "PeriodSplit",
    "convert_news_category",
    "group_by_user",
    "read_interactions_jsonl",
    "read_lamp",
    "read_news_jsonl",
    "select_users",
    "temporal_split",
    "write_interactions_jsonl",
]
