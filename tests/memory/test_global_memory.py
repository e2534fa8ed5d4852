import numpy as np

from transformers_spring.memory import GlobalMemory


def clustered(n_users, per_user, dim=32, n_groups=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_groups, dim))
    labels, users, vecs = [], [], []
    for u in range(n_users):
        center = centers[u % n_groups]
        for _ in range(per_user):
            v = center + 0.3 * rng.normal(size=dim)
            vecs.append(v / np.linalg.norm(v))
            users.append(f"u{u}")
            labels.append(len(labels))
    return labels, users, np.asarray(vecs, dtype=np.float32)


def test_never_returns_own_items_and_respects_min_community_users():
    labels, users, vecs = clustered(9, 10)
    gm = GlobalMemory(32, min_community_users=3, num_threads=1)
    gm.add(labels, users, vecs, [0.0] * len(labels))
    comms = gm.communities()
    assert sorted(u for members in comms.values() for u in members) == sorted(set(users))
    for u in ["u0", "u4"]:
        hits = gm.search(vecs[users.index(u)], 50, user_id=u)
        assert hits and all(users[label] != u for label, _ in hits)
        community = gm.community_of(u)
        assert all(gm.community_of(users[label]) == community for label, _ in hits)
    strict = GlobalMemory(32, min_community_users=100, num_threads=1)
    strict.add(labels, users, vecs, [0.0] * len(labels))
    assert strict.search(vecs[0], 5, user_id="u0") == []


def test_ann_matches_exact_and_survives_deletions():
    labels, users, vecs = clustered(40, 100, seed=1)  # 4000 items
    ann = GlobalMemory(32, min_community_users=1, exact_below=0, n_communities=1, num_threads=1)
    exact = GlobalMemory(32, min_community_users=1, exact_below=10**9, n_communities=1, num_threads=1)
    for gm in (ann, exact):
        gm.add(labels, users, vecs, [0.0] * len(labels))
        gm.remove(list(range(0, 4000, 3)))  # a third deleted: triggers a rebuild
    assert len(ann) == len(exact) == 4000 - 1334 and ann._tombstones == 0
    rng = np.random.default_rng(2)
    recall = []
    for q in vecs[rng.choice(len(vecs), 50)] + 0.2 * rng.normal(size=(50, 32)).astype(np.float32):
        q /= np.linalg.norm(q)
        a = {label for label, _ in ann.search(q, 10, scope="all")}
        e = {label for label, _ in exact.search(q, 10, scope="all")}
        assert not a & set(range(0, 4000, 3))
        recall.append(len(a & e) / 10)
    assert np.mean(recall) >= 0.95


def test_k_is_clamped_and_time_filtered():
    labels, users, vecs = clustered(2, 3)
    gm = GlobalMemory(32, min_community_users=1, min_contributors=1, n_communities=1, exact_below=0, num_threads=1)
    gm.add(labels, users, vecs, [float(i) for i in range(len(labels))])
    assert len(gm.search(vecs[0], 1000, user_id="u0")) == 3  # only u1's three items; no hnswlib error
    assert {label for label, _ in gm.search(vecs[0], 10, before=2.0, scope="all")} == {0, 1}


def test_labels_must_be_new_within_and_across_calls():
    import pytest

    labels, users, vecs = clustered(3, 4)
    gm = GlobalMemory(32, min_community_users=1, min_contributors=1, num_threads=1)
    gm.add(labels[:6], users[:6], vecs[:6], [0.0] * 6)
    for bad in ([5, 100], [200, 200], [-1, 300]):  # a stored label, a repeat in the call, a negative one
        with pytest.raises(ValueError, match="global labels must be new"):
            gm.add(bad, users[:2], vecs[:2], [0.0, 0.0])
    assert len(gm) == 6
    gm.add(labels[6:], users[6:], vecs[6:], [0.0] * 6)  # labels far past the table grow it; rows keep their data
    gm.add([10_000], users[:1], vecs[:1], [0.0])
    assert len(gm) == 13 and all(label in gm for label in [*labels, 10_000])
    assert gm.search(vecs[7], 1, user_id="nobody", scope="all")[0][0] == 7


def test_a_short_ann_answer_widens_before_falling_back_to_exact():
    labels, users, vecs = clustered(60, 50, seed=3)  # 3000 items in 3 groups of users
    ann = GlobalMemory(32, min_community_users=1, min_contributors=1, exact_below=0, n_communities=3, num_threads=1)
    exact = GlobalMemory(
        32, min_community_users=1, min_contributors=1, exact_below=10**9, n_communities=3, num_threads=1
    )
    for gm in (ann, exact):
        gm.add(labels, users, vecs, [0.0] * len(labels))
    index, wants = ann._index, []
    real_query = index.knn_query

    class Spy:  # hnswlib's Index cannot take attributes: wrap it
        def __getattr__(self, name):
            return getattr(index, name)

        def knn_query(self, q, k, num_threads):
            wants.append(k)
            return real_query(q, k=k, num_threads=num_threads)

    ann._index = Spy()
    group = {u: int(u[1:]) % 3 for u in set(users)}
    centers = [vecs[[i for i, u in enumerate(users) if group[u] == g]].mean(0) for g in range(3)]
    widened, recall = 0, []
    for mix in np.linspace(0.0, 0.5, 11):  # queries ever closer to the asker's group (u1: group 1) from group 0
        q = (1 - mix) * centers[0] + mix * centers[1]
        q /= np.linalg.norm(q)
        wants.clear()
        a = ann.search(q, 10, user_id="u1", scope="own")
        e = exact.search(q, 10, user_id="u1", scope="own")
        assert len(a) == 10 and all(users[label] != "u1" and group[users[label]] == 1 for label, _ in a)
        recall.append(len({label for label, _ in a} & {label for label, _ in e}) / 10)
        widened += len(wants) == 2 and wants[1] == 4 * wants[0]
    assert np.mean(recall) >= 0.9
    assert widened  # at least one query came back short at first and was answered by the wider search
