"""convert_news_category and the shipped news subset."""

import json

import pytest

from transformers_spring.data import (
    DEFAULT_NEWS_PATH,
    NEWS_SUBSET_PATH,
    convert_news_category,
    group_by_user,
    read_interactions_jsonl,
    read_news_jsonl,
    temporal_split,
)


def news_row(author, day, n):
    return {
        "link": f"https://example.com/{author}/{n}",
        "headline": f"Headline {n}",
        "category": "POLITICS",
        "short_description": f"Summary {n}",
        "authors": author,
        "date": f"2020-01-{day:02d}",
    }


@pytest.fixture
def news_file(tmp_path):
    # Newest first like the real file; "Solo" has a single item and one record has no author.
    rows = [news_row("Ann", 28 - i, i) for i in range(6)] + [news_row("Bo", 20 - i, 10 + i) for i in range(3)]
    rows += [news_row("Solo", 5, 99), news_row("", 6, 100)]
    path = tmp_path / "news.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_convert_writes_interactions(news_file, tmp_path):
    out = tmp_path / "out" / "stream.jsonl"
    assert convert_news_category(news_file, out) == 10
    items = read_interactions_jsonl(out)
    assert [i.to_dict() for i in items] == [i.to_dict() for i in read_news_jsonl(news_file)]


def test_convert_filters_and_caps(news_file, tmp_path):
    out = tmp_path / "stream.jsonl"
    n = convert_news_category(news_file, out, min_items=2, max_items_per_author=4, metadata_keys=("category",))
    assert n == 7
    by_author = group_by_user(read_interactions_jsonl(out))
    assert list(by_author) == ["Bo", "Ann"]  # oldest first: Bo's items are older
    # Ann's four most recent items (rows 0-3 are the newest), oldest first.
    assert [i.response for i in by_author["Ann"]] == ["Headline 3", "Headline 2", "Headline 1", "Headline 0"]
    assert by_author["Ann"][0].metadata == {"category": "POLITICS"}

    assert convert_news_category(news_file, out, authors=["Solo"]) == 1
    with pytest.raises(ValueError, match="Solo"):
        convert_news_category(news_file, out, authors=["Ann", "Solo"], min_items=2)
    with pytest.raises(TypeError):
        convert_news_category(news_file, out, authors="Ann")
    with pytest.raises(ValueError, match="max_items_per_author"):
        convert_news_category(news_file, out, max_items_per_author=0)


def test_shipped_subset_loads_and_splits_into_five_periods():
    assert NEWS_SUBSET_PATH.is_file()
    assert NEWS_SUBSET_PATH.stat().st_size < 100_000
    assert (NEWS_SUBSET_PATH.parent / "ATTRIBUTION.md").is_file()
    items = read_interactions_jsonl(NEWS_SUBSET_PATH)
    by_author = group_by_user(items)
    assert len(by_author) == 8 and all(len(v) <= 40 for v in by_author.values())
    splits = temporal_split(items, num_periods=5)
    assert set(splits) == set(by_author)
    for periods in splits.values():
        assert len(periods) == 5 and all(p.train and p.test for p in periods)
    # The light authors make some periods short of training data.
    assert min(len(p.train) for periods in splits.values() for p in periods) <= 5


@pytest.mark.skipif(not DEFAULT_NEWS_PATH.is_file(), reason="shared news data missing")
def test_shipped_subset_is_reproducible(tmp_path):
    by_author = group_by_user(read_news_jsonl(DEFAULT_NEWS_PATH))
    ranked = sorted(by_author, key=lambda author: (-len(by_author[author]), author))
    out = tmp_path / "subset.jsonl"
    convert_news_category(
        DEFAULT_NEWS_PATH,
        out,
        authors=ranked[:4] + ranked[48:52],
        max_items_per_author=40,
        metadata_keys=("category",),
    )
    assert out.read_bytes() == NEWS_SUBSET_PATH.read_bytes()
