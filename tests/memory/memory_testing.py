"""Shared helpers for the memory tests."""

from transformers_spring.memory import Interaction

TOPICS = {
    "cats": "cat kitten purr whiskers litter feline meow",
    "rockets": "rocket launch orbit booster nasa spacex payload",
    "bread": "bread bakery sourdough flour oven yeast crust",
    "football": "football goal striker league match referee penalty",
    "elections": "election vote ballot senate campaign poll candidate",
    "weather": "storm rain forecast hurricane flood wind snow",
}


def topical(user: str, topic: str, i: int, ts: float | None = None) -> Interaction:
    """A record about `topic` whose words vary with `i` (so records are not near-duplicates)."""
    words = TOPICS[topic].split()
    picked = " ".join(words[(i + j) % len(words)] for j in range(4))
    return Interaction(user, f"{picked} report {i} by {user}", f"{topic} headline {i} {user}", timestamp=ts or 1e9 + i)
