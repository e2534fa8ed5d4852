"""`LoGoBenchmarkArguments`: the settings of the LoGo study (`spring bench-logo`): does the collective memory help
cold-start users and users with a skewed history?"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..memory.support import DEFAULT_MATCH_THRESHOLD, DEFAULT_MIN_CONTRIBUTORS, check_support_rule
from ..utils.validation import check_float, check_int
from .benchmark_config import BenchmarkArguments


@dataclass
class LoGoBenchmarkArguments(BenchmarkArguments):
    """[`BenchmarkArguments`] (data, model, users, periods, decoding, LoRA settings and their validation selection)
    plus what the LoGo study adds. The study compares local-only SPRInG with SPRInG + LoGo (the global memory
    reconciled by a mediator fitted on validation queries) on the same adapters, items and decoding."""

    history_cuts: str = field(
        default="0,1,3,5,all",
        metadata={
            "help": "Comma-separated history sizes m: each user's test items are evaluated with the user's history "
            "(memory and adapter) cut to their first m items ('all': the whole training stream); the other users' "
            "memories stay whole."
        },
    )
    category_field: str = field(
        default="category",
        metadata={"help": "Metadata field holding an item's topic, for the bias bucket ('' turns the bucket off)."},
    )
    bias_rare_share: float = field(
        default=0.1,
        metadata={"help": "Bias bucket: a test item whose topic makes up less than this share of the user's training "
                  "items ..."},
    )  # fmt: skip
    bias_dominant_share: float = field(
        default=0.5,
        metadata={"help": "... while the user's most frequent topic makes up at least this share."},
    )
    min_contributors: int = field(
        default=DEFAULT_MIN_CONTRIBUTORS,
        metadata={"help": "The sharing rule: distinct users, the author included, whose closely matching content a "
                  "global item needs before it is served (1 turns the rule off)."},
    )  # fmt: skip
    match_threshold: float = field(
        default=DEFAULT_MATCH_THRESHOLD,
        metadata={"help": "The encoder cosine at which two users' items match (the sharing rule)."},
    )
    min_community_users: int = field(
        default=5, metadata={"help": "Smallest community allowed to feed the global memory."}
    )
    mediator_weights: str = field(
        default="0,0.125,0.25,0.375,0.5,0.625,0.75",
        metadata={"help": "The λ grid the mediator is fitted over."},
    )
    mediator_min_examples: int = field(
        default=10, metadata={"help": "Fewest validation queries a mediator cell needs for a rule of its own."}
    )
    compare_open: bool = field(
        default=False,
        metadata={"help": "Also measure LoGo with the sharing rule off (min_contributors=1, its own fitted mediator): "
                  "what the privacy rule costs."},
    )  # fmt: skip
    out: str = field(default="logo-bench-out", metadata={"help": "Output directory."})

    def __post_init__(self):
        super().__post_init__()
        self.cuts()
        self.weight_grid()
        check_support_rule(self.min_contributors, self.match_threshold)
        for name in ("bias_rare_share", "bias_dominant_share"):
            check_float(getattr(self, name), name, minimum=0.0, maximum=1.0)
        check_int(self.min_community_users, "min_community_users", minimum=1)
        check_int(self.mediator_min_examples, "mediator_min_examples", minimum=2)

    def cuts(self) -> list[int | None]:
        """The history sizes, ascending, `None` for 'all' (last)."""
        values: list[int | None] = []
        for part in (p.strip() for p in self.history_cuts.split(",")):
            if not part:
                continue
            if part == "all":
                values.append(None)
                continue
            if not part.isdigit():
                raise ValueError(
                    f"`history_cuts` must be comma-separated ints >= 0 or 'all', got {self.history_cuts!r}."
                )
            values.append(int(part))
        if not values:
            raise ValueError("`history_cuts` is empty.")
        numbers = sorted(set(v for v in values if v is not None))
        return numbers + ([None] if None in values else [])

    def weight_grid(self) -> list[float]:
        try:
            values = [float(v) for v in self.mediator_weights.split(",") if v.strip()]
        except ValueError as err:
            raise ValueError(
                f"`mediator_weights` must be comma-separated numbers, got {self.mediator_weights!r}."
            ) from err
        if not values or any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"`mediator_weights` must hold numbers in [0, 1], got {self.mediator_weights!r}.")
        return sorted(set(values))
