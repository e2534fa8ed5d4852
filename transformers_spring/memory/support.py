"""The collective memory's sharing rule: an item is served to other users only when enough distinct users contributed
closely matching content, so what the global memory hands out is a shared interest, never one user's unique text."""

from __future__ import annotations

from ..utils.validation import check_float, check_int

DEFAULT_MIN_CONTRIBUTORS = 3
DEFAULT_MATCH_THRESHOLD = 0.75

# What the global memory may hand to other users (see [`LoGoMemory`]'s `sharing`):
# - "private": every sharing user's items feed it, but an item is served only under the contributor rule below, so
#   nobody's unique text ever reaches another user;
# - "consented": only the items of users who opted in (`set_sharing(user, True)`) feed it, and those are served
#   verbatim (public or consented text: published headlines, public reviews, a team's shared documents).
SHARING_POLICIES = ("private", "consented")


def check_support_rule(min_contributors, match_threshold, max_matches=None) -> None:
    """Validates the rule's parameters (see [`~utils.validation`]: a wrong type is a `TypeError`, a value out of
    range a `ValueError`, each naming the field)."""
    check_int(
        min_contributors,
        "min_contributors",
        minimum=1,
        hint="distinct users, the author included, whose closely matching content an item needs before it is "
        "served; 1 turns the rule off",
    )
    check_float(
        match_threshold,
        "match_threshold",
        minimum=0.0,
        maximum=1.0,
        min_inclusive=False,
        hint="the cosine at which another user's item counts as matching content",
    )
    check_int(max_matches, "max_matches", minimum=1, optional=True)


class ContributorSupport:
    """Who backs each shared item: the graph of **matches** (pairs of items by different users with cosine
    `>= match_threshold`) and, per item, the distinct other users among its matches.

    An item is **servable** to other users when at least `min_contributors - 1` other users have a matching item
    (with its author, `min_contributors` distinct contributors). A user's unique item, one nobody else wrote anything
    close to, is never servable, however many users share their community or how many of them write on the same
    topic. Deleting an item (or forgetting its user, or an opt-out) removes its matches at once, so the support it
    gave to others' items disappears with it.

    The graph is keyed by [`GlobalMemory`] labels; the memory finds the matches (exactly, or by its ANN index on large
    memories: an approximate search can only miss a match, so it can only withhold an item, never serve one).

    Args:
        min_contributors (`int`, *optional*, defaults to 3): distinct users, the author included, behind a served item.
        match_threshold (`float`, *optional*, defaults to 0.75): the cosine at which two users' items match. The
            default suits all-MiniLM-L6-v2: on the news benchmark, topic-copying fake users reach 0.7 on a real
            author's unique items but not 0.75.
    """

    def __init__(
        self, min_contributors: int = DEFAULT_MIN_CONTRIBUTORS, match_threshold: float = DEFAULT_MATCH_THRESHOLD
    ):
        check_support_rule(min_contributors, match_threshold)
        self.min_contributors = int(min_contributors)
        self.match_threshold = float(match_threshold)
        self._matches: dict[int, set[int]] = {}  # label -> labels of matching items by other users
        self._backers: dict[int, dict[int, int]] = {}  # label -> {other user index: how many of their items match}
        self._user: dict[int, int] = {}  # label -> its user's index

    @property
    def needed(self) -> int:
        """How many distinct *other* users must back an item."""
        return self.min_contributors - 1

    # Match sets and backer counts are created on an item's first match: most items never match, and a load
    # registers every shared item at once.
    def register(self, label: int, user: int) -> None:
        self._user[label] = user

    def register_many(self, labels: list[int], users: list[int]) -> None:
        """[`~ContributorSupport.register`] for many new labels at once."""
        self._user.update(zip(labels, users, strict=True))

    def link(self, a: int, b: int) -> list[int]:
        """Records that items `a` and `b` (of different users) match; returns the labels whose backer count changed."""
        if self._user[a] == self._user[b] or b in self._matches.get(a, ()):
            return []
        changed = []
        for x, y in ((a, b), (b, a)):
            self._matches.setdefault(x, set()).add(y)
            backers = self._backers.setdefault(x, {})
            user = self._user[y]
            backers[user] = backers.get(user, 0) + 1
            if backers[user] == 1:
                changed.append(x)
        return changed

    def unregister(self, label: int) -> list[int]:
        """Drops an item and its matches; returns the labels whose backer count changed."""
        changed = []
        user = self._user.pop(label, None)
        for other in self._matches.pop(label, set()):
            self._matches[other].discard(label)
            backers = self._backers[other]
            backers[user] -= 1
            if backers[user] == 0:
                del backers[user]
                changed.append(other)
        self._backers.pop(label, None)
        return changed

    def pairs(self) -> list[tuple[int, int]]:
        """Every match as a `(label, label)` pair with the smaller label first, each pair once."""
        return [(a, b) for a, others in self._matches.items() for b in others if a < b]

    def backers(self, label: int) -> int:
        """The number of distinct other users with an item matching `label`."""
        return len(self._backers.get(label, ()))

    def backers_before(self, label: int, timestamp_of, before: float) -> int:
        """Like [`backers`], counting only matching items dated strictly before `before` (an evaluation's query
        time: content written later cannot back an item yet)."""
        users = {self._user[m] for m in self._matches.get(label, ()) if timestamp_of(m) < before}
        return len(users)
