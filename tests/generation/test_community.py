"""The community adapters' routing table: nearest centroid, thresholds, names, and its file."""

import json

import numpy as np
import pytest

from transformers_spring.generation import CommunityAdapter, CommunityAdapters
from transformers_spring.persistence.community_files import read_community_adapters, write_community_adapters


def table(**kwargs):
    return CommunityAdapters(
        adapters=[
            CommunityAdapter("__community_0", ["a", "b", "c"], np.array([3.0, 0.0, 0.0]), 30),
            CommunityAdapter("__community_1", ["d", "e", "f"], np.array([0.0, 1.0, 0.0]), 12, ["g"]),
        ],
        **kwargs,
    )


def test_route_picks_the_nearest_centroid_above_the_threshold():
    t = table()
    assert np.isclose(np.linalg.norm(t["__community_0"].centroid), 1.0)  # normalised on the way in
    assert t.route(np.array([0.9, 0.2, 0.0])) == "__community_0"
    assert t.route(np.array([0.1, 0.8, 0.1])) == "__community_1"
    assert t.route(None) is None and t.route(np.zeros(3)) is None and t.route(np.ones(4)) is None
    assert t.route(np.array([0.9, 0.2, 0.0]), available={"__community_1"}) == "__community_1"
    assert table(min_similarity=0.9).route(np.array([0.0, 0.0, 1.0])) is None  # nothing close enough
    assert t.contributed("b") == ["__community_0"] and t.contributed("g") == []
    assert t.next_name(["__community_2"]) == "__community_3"


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="min_users"):
        CommunityAdapters(min_users=0)
    with pytest.raises(ValueError, match="min_similarity"):
        CommunityAdapters(min_similarity=2.0)
    with pytest.raises(ValueError, match="max_items_per_user"):
        CommunityAdapters(max_items_per_user=0)
    with pytest.raises(ValueError, match="centroid"):
        CommunityAdapters(adapters=[CommunityAdapter("__community_0", ["a"], np.zeros(3), 1)])


def test_the_file_round_trips_and_is_checked(tmp_path):
    t = table(min_users=2, min_similarity=0.1, max_items_per_user=None)
    write_community_adapters(tmp_path, t)
    loaded = read_community_adapters(tmp_path, {"__community_0", "__community_1"})
    assert (loaded.min_users, loaded.min_similarity, loaded.max_items_per_user) == (2, 0.1, None)
    for a in t:
        b = loaded[a.name]
        assert (b.members, b.num_items, b.initialized) == (a.members, a.num_items, a.initialized)
        np.testing.assert_allclose(b.centroid, a.centroid, rtol=1e-6)
    assert read_community_adapters(tmp_path / "missing") is None
    data = json.loads((tmp_path / "community_adapters.json").read_text())
    for edit, match in (
        ({"format_version": 2}, "format_version"),
        ({"min_users": 0}, "min_users"),
        ({"adapters": [{**data["adapters"][0], "initialized": ["x", "x"]}]}, r"adapters\[0\]\.initialized"),
        ({"adapters": [data["adapters"][0], data["adapters"][0]]}, "twice"),
        ({"adapters": [data["adapters"][0], {**data["adapters"][1], "centroid": [1.0]}]}, r"adapters\[1\]\.centroid"),
    ):
        (tmp_path / "community_adapters.json").write_text(json.dumps({**data, **edit}))
        with pytest.raises(ValueError, match=match):
            read_community_adapters(tmp_path)
