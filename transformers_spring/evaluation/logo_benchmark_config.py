"""`LoGoBenchmarkArguments`: the settings of the LoGo study (`spring bench-logo`): does the collective memory help
cold-start users and users with a skewed history, under a stated sharing policy?"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.validation import check_choice, check_float, check_int
from .benchmark_config import BenchmarkArguments

# The study's arms: the `arms` option's names -> the method names its records carry.
LOGO_ARMS = {
    "consented": "spring-logo-consented",
    "community": "spring-community",
    "both": "spring-community-consented",
}


@dataclass
class LoGoBenchmarkArguments(BenchmarkArguments):
    """[`BenchmarkArguments`] (data, model, users, periods, decoding, LoRA settings and their validation selection)
    plus what the LoGo study adds. The study compares local-only SPRInG with its arms (`arms`): retrieval from the
    items of users who consented (`LoGoMemory(sharing_policy="consented")`, reconciled by a mediator fitted on
    validation queries), community adapters under the private policy, and both, on the same items and decoding."""

    interpolation_weight: float = field(
        default=0.25,
        metadata={"help": "λ of local-only SPRInG, the baseline every arm is measured against, and the mediators' "
                  "local decision (the measured decoding preset's 0.25; the paper's is 0.5)."},
    )  # fmt: skip
    retrieval_region: str = field(
        default="all",
        metadata={"help": "Where local hits come from: 'all' (the user's whole history, the measured preset) or "
                  "'buffer' (SPRInG's residual buffer, the paper's; empty after a period 0)."},
    )  # fmt: skip
    gate: str = field(
        default="off",
        metadata={"help": "The relevance gate on local hits: 'off' (the measured preset) or 'quantile' (σ = the "
                  "gate_quantile of training queries' scores, frozen before any validation or test query)."},
    )  # fmt: skip
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
    arms: str = field(
        default="consented,community,both",
        metadata={"help": "Comma-separated arms measured against local-only SPRInG: 'consented' (retrieval from every "
                  "consenting user's items, served verbatim: news headlines are published), 'community' (the "
                  "user's adapter starts from their community's adapter; with no history, the community adapter "
                  "nearest the query decodes), 'both'."},
    )  # fmt: skip
    community_min_users: int = field(
        default=3, metadata={"help": "The fewest users of a community adapter (train_community_adapters' min_users)."}
    )
    community_max_items_per_user: int = field(
        default=64, metadata={"help": "The most (latest) items each member gives a community adapter."}
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
    out: str = field(default="logo-bench-out", metadata={"help": "Output directory."})

    def __post_init__(self):
        super().__post_init__()
        self.cuts()
        self.weight_grid()
        self.arm_names()
        check_choice(self.retrieval_region, "retrieval_region", ("all", "buffer", "history"))
        check_choice(self.gate, "gate", ("off", "quantile"))
        check_int(self.community_min_users, "community_min_users", minimum=1)
        check_int(self.community_max_items_per_user, "community_max_items_per_user", minimum=1)
        for name in ("bias_rare_share", "bias_dominant_share"):
            check_float(getattr(self, name), name, minimum=0.0, maximum=1.0)
        check_int(self.min_community_users, "min_community_users", minimum=1)
        check_int(self.mediator_min_examples, "mediator_min_examples", minimum=2)

    def arm_names(self) -> list[str]:
        """The arms, in the order given (checked: known, at least one, no repeat)."""
        names = [part.strip() for part in self.arms.split(",") if part.strip()]
        if not names or len(set(names)) != len(names) or set(names) - set(LOGO_ARMS):
            raise ValueError(f"`arms` must be comma-separated names among {list(LOGO_ARMS)}, got {self.arms!r}.")
        return names

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
