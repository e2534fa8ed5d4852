"""The retrieval-interpolation logits processor: SPRInG's dual-path decoding inside a plain `model.generate()`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
from transformers import LogitsProcessor
from transformers.utils import logging

from ..utils.compat import (
    cache_kwargs,
    left_padded_positions,
    none_if_full,
    output_cache,
    select_cache_rows,
    supports_logits_to_keep,
)
from ..utils.validation import check_choice, check_float
from .adapters import AdapterRouter, override_adapters
from .config import PENALTY_MODES, check_adaptive_weight, check_early_exit, check_weight

logger = logging.get_logger(__name__)

_LOG2 = math.log(2.0)


def apply_repetition_penalty(
    input_ids: torch.LongTensor, scores: torch.Tensor, penalty: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """
    HF's `RepetitionPenaltyLogitsProcessor` (same arithmetic, so the same floats), returning a new tensor, with an
    optional `valid` mask: ids at positions where `valid` is False (padding) are not penalised, which keeps batched
    and unbatched generation equal.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, seq)`): the sequences whose tokens are penalised.
        scores (`torch.Tensor` of shape `(batch, vocab)`): logits (or log-probs).
        penalty (`float`): > 1 discourages repetition.
        valid (`torch.BoolTensor` of shape `(batch, seq)`, *optional*): which positions count.
    """
    if valid is None:
        score = torch.gather(scores, 1, input_ids)
        score = torch.where(score < 0, score * penalty, score / penalty)
        return scores.scatter(1, input_ids, score)
    vocab = scores.shape[-1]
    # Padding positions point at an extra dummy column that is dropped afterwards.
    ids = input_ids.masked_fill(~valid, vocab)
    padded = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=-1)
    score = torch.gather(padded, 1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return padded.scatter(1, ids, score)[:, :vocab]


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise Jensen–Shannon divergence (nats, in [0, ln 2]) between two log-probability tensors."""
    log_m = torch.logaddexp(log_p, log_q) - _LOG2

    def _kl(log_a: torch.Tensor) -> torch.Tensor:
        terms = log_a.exp() * (log_a - log_m)
        return torch.nan_to_num(terms, nan=0.0).sum(-1)  # 0 · log 0 = 0 where a token has zero mass

    return (0.5 * _kl(log_p) + 0.5 * _kl(log_q)).clamp_min(0.0)


def log_mixture(
    log_hist: torch.Tensor, log_main: torch.Tensor, log_weight: torch.Tensor, log_one_minus_weight: torch.Tensor
) -> torch.Tensor:
    """SPRInG's mixture in log space, `log(λ · p_hist + (1 − λ) · p_main)` from log-probabilities and `log λ`,
    `log(1 − λ)`: the one place decoding (the processor) and scoring (`SpringForCausalLM.score`) compute it. λ = 1
    gives `log_hist` exactly (`log(1 − λ)` is −inf), λ = 0 `log_main`."""
    return torch.logaddexp(log_hist + log_weight, log_main + log_one_minus_weight)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each distribution in the last dimension of `logprobs` (normalised log-probabilities;
    `-inf` entries count as zero mass)."""
    return torch.special.entr(logprobs.exp()).sum(-1)


def adaptive_log_weights(
    weight: torch.Tensor, adaptive_weight: torch.Tensor, entropy_hist: torch.Tensor, entropy_main: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`log λ_t` and `log(1 − λ_t)` of the per-token adaptive λ: `λ_t = σ(logit λ + β · (H_main − H_hist))`.

    The path that is more confident at this token (lower entropy of its next-token distribution) gets more weight,
    as in kNN-LM work that sets the interpolation per token from the two distributions' confidence. β = 0 is the
    fixed λ, computed as `log λ`, `log1p(−λ)` so that it is bit-identical to decoding without the option; λ = 1 stays 1
    (`logit 1 = +∞`). All arguments broadcast (one value per row, or per row and token).

    Args:
        weight (`torch.Tensor`): λ in `[0, 1]`.
        adaptive_weight (`torch.Tensor`): β ≥ 0.
        entropy_hist (`torch.Tensor`): the history path's next-token entropy (nats).
        entropy_main (`torch.Tensor`): the parametric path's.
    """
    logit = torch.logit(weight) + adaptive_weight * (entropy_main - entropy_hist)
    fixed = adaptive_weight == 0
    log_w = torch.where(fixed, torch.log(weight), torch.nn.functional.logsigmoid(logit))
    log_1mw = torch.where(fixed, torch.log1p(-weight), torch.nn.functional.logsigmoid(-logit))
    return log_w, log_1mw


def mix_logprobs(
    log_hist: torch.Tensor | None,
    log_main: torch.Tensor | None,
    weight: float,
    *,
    adaptive_weight: float = 0.0,
    entropy_hist: torch.Tensor | None = None,
    entropy_main: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token log-probabilities under SPRInG's mixture with one λ, from each path's log-probabilities of the same
    tokens: [`log_mixture`] (the one implementation), with λ = 0 giving `log_main` and λ = 1 `log_hist` exactly, so
    a path that is not needed may be None. Used by `SpringForCausalLM.score` and the LoGo study's λ grid.

    Args:
        log_hist (`torch.Tensor`, *optional*): the history path's log-probabilities (None when λ = 0).
        log_main (`torch.Tensor`, *optional*): the parametric path's (None when λ = 1).
        weight (`float`): λ in `[0, 1]`.
        adaptive_weight (`float`, *optional*, defaults to 0.0): β of the per-token adaptive λ
            ([`adaptive_log_weights`]); 0 keeps λ fixed.
        entropy_hist (`torch.Tensor`, *optional*): with β > 0, each position's next-token entropy on the history
            path (the full distribution's, not only the scored token's).
        entropy_main (`torch.Tensor`, *optional*): the same on the parametric path.
    """
    weight = check_weight(weight, "weight")
    adaptive_weight = check_adaptive_weight(adaptive_weight, "adaptive_weight")
    if adaptive_weight > 0 and 0.0 < weight < 1.0 and log_hist is not None and log_main is not None:
        if entropy_hist is None or entropy_main is None:
            raise ValueError("mix_logprobs needs both paths' entropies when `adaptive_weight` > 0.")
        dtype = log_hist.dtype
        log_w, log_1mw = adaptive_log_weights(
            torch.tensor(weight, dtype=dtype), torch.tensor(adaptive_weight, dtype=dtype),
            entropy_hist.to(dtype), entropy_main.to(dtype),
        )  # fmt: skip
        return log_mixture(log_hist, log_main, log_w, log_1mw)
    if weight <= 0.0 or log_hist is None:
        if log_main is None:
            raise ValueError("mix_logprobs needs the parametric path's log-probabilities when λ < 1.")
        return log_main
    if weight >= 1.0 or log_main is None:
        if weight < 1.0:
            raise ValueError("mix_logprobs needs the parametric path's log-probabilities when λ < 1.")
        return log_hist
    lam = torch.tensor(weight, dtype=log_hist.dtype, device=log_hist.device)
    return log_mixture(log_hist, log_main, torch.log(lam), torch.log1p(-lam))


def _per_row(value: float | Sequence[float] | torch.Tensor, batch: int, name: str) -> list[float]:
    """One value per row from a float (every row), a sequence or a tensor of `batch` values; a `TypeError` or a
    `ValueError` naming `name` otherwise."""
    if isinstance(value, torch.Tensor):
        values = [float(v) for v in value.reshape(-1).tolist()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [value] * batch
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
    else:
        raise TypeError(f"`{name}` must be a float or a sequence of floats, got {type(value).__name__}.")
    if len(values) != batch:
        raise ValueError(f"`{name}` has {len(values)} values but `history_input_ids` has {batch} rows.")
    return values


class RetrievalInterpolationLogitsProcessor(LogitsProcessor):
    r"""
    SPRInG's retrieval interpolation (paper Eq. 6–8) as a [`~transformers.LogitsProcessor`]:
    `log p = log(λ · p(· | history, prompt) + (1 − λ) · p(· | prompt))`.

    The main `generate()` loop provides the parametric path (`scores`); this processor runs the history-conditioned
    path itself, with its own KV cache: it prefills `history_input_ids` on its first call and afterwards feeds it the
    token the main loop chose at the previous step. It returns normalised log-probabilities of the mixture, never
    mixes raw logits and never modifies `scores` in place.

    Rows whose weight is 0 (a closed gate) get no second forward at all: their output is `log_softmax(scores)`.

    Ordering with the other processors: `generate()` runs its built-in processors (repetition penalty, bad words,
    min length, ...) *before* user processors, so `scores` arrive already processed for the main path. Tokens that an
    earlier processor banned (`-inf`) stay banned after the mix. Pass `repetition_penalty` *here* (and not to
    `generate`) to penalise each path over its own sequence before the mix (`penalty_mode="per_path"`, the default)
    or the mixture once (`penalty_mode="mixture"`). Sampling warpers (temperature, top-k/p) run after the mix.

    Beam search is not supported: a reordering of the rows between two calls (or a batch that is not the history
    batch) raises an error instead of silently mixing the wrong cache rows.

    Build a fresh instance for every `generate()` call: it is stateful and single-use.

    Args:
        model (`nn.Module`):
            The model that decodes (the same, possibly adapted, model for both paths).
        history_input_ids (`torch.LongTensor` of shape `(batch, history_len)`):
            Per row, the history-conditioned input (retrieved history + the prompt), **left-padded**.
        history_attention_mask (`torch.LongTensor` of shape `(batch, history_len)`, *optional*):
            Its attention mask; all ones when omitted.
        weight (`float` or sequence of `float`, *optional*, defaults to 0.5):
            λ, one value or one per row, in `[0, 1]`. A 0 closes the row's gate.
        repetition_penalty (`float`, *optional*):
            Repetition penalty applied inside the processor (see `penalty_mode`).
        penalty_mode (`str`, *optional*, defaults to `"per_path"`):
            `"per_path"` or `"mixture"`.
        prompt_attention_mask (`torch.LongTensor` of shape `(batch, prompt_len)`, *optional*):
            The main prompt's attention mask; padding is then excluded from the main path's repetition penalty.
        early_exit_epsilon (`float`, *optional*, defaults to 0.0):
            Stop a row's history path once the Jensen–Shannon divergence between the two paths stayed below this for
            `early_exit_patience` steps; 0 disables it.
        early_exit_patience (`int`, *optional*, defaults to 4):
            Consecutive low-divergence steps before a row exits.
        eos_token_id (`int` or list of `int`, *optional*):
            When given, a row that produced one of these tokens stops computing its history path (its later tokens are
            padding anyway).
        adapter_router ([`AdapterRouter`], *optional*):
            Routes per-row LoRA adapters; `adapter_names` must then be given too.
        adapter_names (list of `str`, *optional*):
            The adapter of each row (`"__base__"` for none), used for this processor's own forwards.
        adaptive_weight (`float` or sequence of `float`, *optional*, defaults to 0.0):
            β of the per-token adaptive λ, one value or one per row, ≥ 0 ([`adaptive_log_weights`]: the paths'
            entropies are those of the distributions mixed, after the per-path repetition penalty). 0 keeps λ fixed.
    """

    # The paged / continuous-batching path passes 3-D scores and has no notion of our per-request cache.
    supports_continuous_batching = False

    def __init__(
        self,
        model: nn.Module,
        history_input_ids: torch.LongTensor,
        history_attention_mask: torch.LongTensor | None = None,
        weight: float | Sequence[float] | torch.Tensor = 0.5,
        *,
        repetition_penalty: float | None = None,
        penalty_mode: str = "per_path",
        prompt_attention_mask: torch.LongTensor | None = None,
        early_exit_epsilon: float = 0.0,
        early_exit_patience: int = 4,
        eos_token_id: int | Iterable[int] | None = None,
        adapter_router: AdapterRouter | None = None,
        adapter_names: Sequence[str] | None = None,
        adaptive_weight: float | Sequence[float] = 0.0,
    ):
        if not isinstance(history_input_ids, torch.Tensor) or history_input_ids.dim() != 2:
            raise ValueError("`history_input_ids` must be a 2-D LongTensor of shape (batch, history_len).")
        batch, length = history_input_ids.shape
        if history_attention_mask is None:
            history_attention_mask = torch.ones_like(history_input_ids)
        if history_attention_mask.shape != history_input_ids.shape:
            raise ValueError(
                f"`history_attention_mask` has shape {tuple(history_attention_mask.shape)}, expected "
                f"{tuple(history_input_ids.shape)} like `history_input_ids`."
            )
        # A real token must sit in the last column of every used row: the next position is read from there.
        if length and bool(((history_attention_mask[:, -1] == 0) & (history_attention_mask.sum(-1) > 0)).any()):
            raise ValueError("`history_input_ids` must be left-padded (its attention mask ends with 0 in some row).")
        weights = [check_weight(w, "weight") for w in _per_row(weight, batch, "weight")]
        betas = [
            check_adaptive_weight(b, "adaptive_weight") for b in _per_row(adaptive_weight, batch, "adaptive_weight")
        ]
        check_choice(penalty_mode, "penalty_mode", PENALTY_MODES)
        check_float(repetition_penalty, "repetition_penalty", minimum=0.0, min_inclusive=False, optional=True)
        check_early_exit(early_exit_epsilon, early_exit_patience)
        if prompt_attention_mask is not None and prompt_attention_mask.shape[0] != batch:
            raise ValueError(f"`prompt_attention_mask` has {prompt_attention_mask.shape[0]} rows, expected {batch}.")
        if adapter_router is not None and (adapter_names is None or len(adapter_names) != batch):
            raise ValueError("`adapter_names` must give one adapter per row when `adapter_router` is set.")

        self.model = model
        self.batch_size = batch
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self._log_weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self.adaptive_weights = torch.tensor(betas, dtype=torch.float32)
        self.repetition_penalty = None if repetition_penalty in (None, 1.0) else float(repetition_penalty)
        self.penalty_mode = penalty_mode
        self.prompt_attention_mask = prompt_attention_mask
        self.early_exit_epsilon = float(early_exit_epsilon)
        self.early_exit_patience = early_exit_patience
        if eos_token_id is None:
            self.eos_token_ids = None
        else:
            ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            self.eos_token_ids = torch.tensor(ids, dtype=torch.long)
        self.adapter_router = adapter_router
        self.adapter_names = list(adapter_names) if adapter_names is not None else None
        self._logits_to_keep = supports_logits_to_keep(model)

        # Rows whose gate is open and that have something to condition on.
        open_rows = [r for r in range(batch) if weights[r] > 0 and int(history_attention_mask[r].sum()) > 0]
        self._active = torch.tensor(open_rows, dtype=torch.long)
        ids, mask = self._trim_left(history_input_ids[self._active], history_attention_mask[self._active])
        self._hist_ids, self._hist_mask = ids, mask  # the active rows' history inputs, for prefill and the penalty

        # Decoding state.
        self.external = False  # True inside the fused loop, which computes the history logits itself
        self._external_logits: torch.Tensor | None = None
        self._cache = None
        self._cache_mask: torch.Tensor | None = None
        self._next_positions: torch.Tensor | None = None
        self._prompt_len: int | None = None
        self._prev_input_ids: torch.Tensor | None = None
        self._streak = torch.zeros(batch, dtype=torch.long)
        self.steps = 0
        self.history_forward_calls = 0
        self.history_row_steps = 0  # sum over steps of rows whose history path was mixed in
        self.exit_steps: dict[int, int] = {}

    # ------------------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _trim_left(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drops leading columns that are padding in every row (a subset of rows may need less padding)."""
        if ids.shape[0] == 0:
            return ids[:, :0], mask[:, :0]
        used = (mask != 0).any(0).nonzero()
        start = int(used[0]) if used.numel() else ids.shape[1]
        return ids[:, start:], mask[:, start:]

    @property
    def active_rows(self) -> list[int]:
        """The rows whose history path is still computed, in the order of the history batch."""
        return self._active.tolist()

    @property
    def has_active_rows(self) -> bool:
        return self._active.numel() > 0

    def history_prefill_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The left-padded history inputs of the active rows (used by the fused decoder for its prefill)."""
        return self._hist_ids, self._hist_mask

    def provide_history_logits(self, logits: torch.Tensor) -> None:
        """Fused mode: hands over the history path's next-token logits of the active rows (in `active_rows` order)
        for the coming call."""
        self._external_logits = logits

    def deactivate(self, rows: Iterable[int]) -> None:
        """Stops computing the history path of `rows` (finished or converged); their output becomes parametric."""
        drop = set(int(r) for r in rows)
        if not drop:
            return
        keep = [i for i, r in enumerate(self._active.tolist()) if r not in drop]
        if len(keep) == self._active.numel():
            return
        keep_t = torch.tensor(keep, dtype=torch.long)
        self._active = self._active[keep_t]
        self._hist_ids, self._hist_mask = self._hist_ids[keep_t], self._hist_mask[keep_t]
        if self._cache is not None:
            if keep:
                select_cache_rows(self._cache, keep_t.to(self._next_positions.device))
                self._next_positions = self._next_positions[keep_t.to(self._next_positions.device)]
                if self._cache_mask is not None:
                    self._cache_mask = self._cache_mask[keep_t.to(self._cache_mask.device)]
            else:
                self._cache, self._cache_mask, self._next_positions = None, None, None

    def _check_batch(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> None:
        if scores.dim() != 2:
            raise ValueError(
                f"{type(self).__name__} expects 2-D scores (batch, vocab), got shape {tuple(scores.shape)}; "
                "continuous batching / paged generation is not supported."
            )
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(
                f"{type(self).__name__} was built for {self.batch_size} row(s) but generate() passed "
                f"{input_ids.shape[0]}. Beam search (`num_beams` > 1) is not supported; for "
                "`num_return_sequences` > 1, repeat the history rows with `repeat_interleave` (SpringForCausalLM "
                "does this for you)."
            )
        if self._prev_input_ids is not None:
            prev = self._prev_input_ids
            name, seen, now = type(self).__name__, prev.shape[1], input_ids.shape[1]
            if now <= seen:  # a new generate() starts over from its prompt
                raise RuntimeError(
                    f"this {name} was already used by an earlier generate() call; a processor is single-use: build a "
                    "fresh one (SpringForCausalLM.logits_processor(...)) for every generate() call. (This call passed "
                    f"{now} token(s); the last call had {seen}, and each call must add exactly one.)"
                )
            if now > seen + 1:
                raise RuntimeError(
                    f"assisted / speculative decoding (several tokens per step) is not supported by {name}: this call "
                    f"added {now - seen} tokens ({now} after {seen}); it must see exactly one new token per call."
                )
            if not torch.equal(input_ids[:, :-1], prev):
                raise RuntimeError(
                    f"{type(self).__name__}: the rows were reordered between two steps (beam search?). Its history "
                    "cache cannot follow reordered rows; use greedy decoding or sampling (`num_beams=1`)."
                )

    def _own_history_forward(self, input_ids: torch.LongTensor, first: bool) -> torch.Tensor:
        """Serial mode: one forward of the history path for the active rows, with this processor's own cache."""
        active = self._active.to(input_ids.device)
        kwargs = {"use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if first:
            ids = self._hist_ids.to(input_ids.device)
            mask = self._hist_mask.to(input_ids.device)
            positions = left_padded_positions(mask)
            # Like generate(): an all-ones mask is dropped, so λ = 1 reproduces plain generate() bit for bit.
            self._cache_mask = none_if_full(mask)
            step_ids, past = ids, None
        else:
            step_ids, past = input_ids[active, -1:], self._cache
            positions = self._next_positions
            if self._cache_mask is not None:
                self._cache_mask = torch.cat([self._cache_mask, self._cache_mask.new_ones(len(active), 1)], dim=-1)
        names = [self.adapter_names[r] for r in self._active.tolist()] if self.adapter_router is not None else None
        with override_adapters(self.adapter_router, names):
            outputs = self.model(
                input_ids=step_ids,
                attention_mask=self._cache_mask,
                position_ids=positions,
                **cache_kwargs(self.model, past),
                **kwargs,
            )
        self.history_forward_calls += 1
        self._cache = output_cache(outputs)
        self._next_positions = positions[:, -1:] + 1
        return outputs.logits[:, -1].to(dtype=torch.float32)

    def _valid_mask(
        self, prefix_mask: torch.Tensor | None, n_rows: int, generated: int, device
    ) -> torch.Tensor | None:
        if prefix_mask is None:
            return None
        tail = torch.ones(n_rows, generated, dtype=torch.bool, device=device)
        return torch.cat([prefix_mask.to(device).bool(), tail], dim=-1)

    # ------------------------------------------------------------------------------------------------------- __call__
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._check_batch(input_ids, scores)
        first = self._prompt_len is None
        if first:
            self._prompt_len = input_ids.shape[1]
        elif self.eos_token_ids is not None and self.has_active_rows and not self.external:
            # Rows that just finished: generate() pads them from now on, so their history path is wasted work. (The
            # fused decoder drops finished rows itself, before its next forward.)
            done = torch.isin(input_ids[:, -1], self.eos_token_ids.to(input_ids.device))
            self.deactivate(done.nonzero().flatten().tolist())
        self._prev_input_ids = input_ids
        self.steps += 1
        generated = input_ids.shape[1] - self._prompt_len

        main = scores
        if self.repetition_penalty is not None and self.penalty_mode == "per_path":
            valid = self._valid_mask(self.prompt_attention_mask, input_ids.shape[0], generated, input_ids.device)
            main = apply_repetition_penalty(input_ids, scores, self.repetition_penalty, valid)
        log_main = torch.log_softmax(main.float(), dim=-1)
        output = log_main

        if self.has_active_rows:
            if self.external:
                hist_logits = self._take_external_logits()
            else:
                hist_logits = self._own_history_forward(input_ids, first)
            active = self._active.to(scores.device)
            hist_logits = hist_logits.to(scores.device).float()
            if self.repetition_penalty is not None and self.penalty_mode == "per_path":
                hist_seq = torch.cat([self._hist_ids.to(input_ids.device), input_ids[active, self._prompt_len :]], -1)
                valid = self._valid_mask(self._hist_mask, len(active), generated, input_ids.device)
                hist_logits = apply_repetition_penalty(hist_seq, hist_logits, self.repetition_penalty, valid)
            log_hist = torch.log_softmax(hist_logits, dim=-1)
            if self._log_weights is None or self._log_weights[0].device != scores.device:
                weights = self.weights.to(scores.device).unsqueeze(-1)
                self._log_weights = (
                    torch.log(weights),
                    torch.log1p(-weights),
                )  # log λ, log(1 − λ), once per generation
            log_w, log_1mw = self._log_weights
            log_w, log_1mw = log_w[active], log_1mw[active]
            betas = self.adaptive_weights[self._active]
            if bool((betas > 0).any()):  # the per-token adaptive λ, from this step's two distributions
                betas = betas.to(scores.device).unsqueeze(-1)
                weights = self.weights[self._active].to(scores.device).unsqueeze(-1)
                h_hist, h_main = entropy(log_hist).unsqueeze(-1), entropy(log_main[active]).unsqueeze(-1)
                log_w, log_1mw = adaptive_log_weights(weights, betas, h_hist, h_main)
            mixed = log_mixture(log_hist, log_main[active], log_w, log_1mw)
            output = log_main.index_copy(0, active, mixed)
            # Tokens banned upstream (min length, bad words, forced tokens...) must stay banned after the mix.
            output = output.masked_fill(torch.isneginf(scores), -math.inf)
            self.history_row_steps += len(active)
            if self.early_exit_epsilon > 0:
                self._update_early_exit(log_hist, log_main[active])

        if self.repetition_penalty is not None and self.penalty_mode == "mixture":
            valid = self._valid_mask(self.prompt_attention_mask, input_ids.shape[0], generated, input_ids.device)
            output = apply_repetition_penalty(input_ids, output, self.repetition_penalty, valid)
        return output

    def _take_external_logits(self) -> torch.Tensor:
        logits, self._external_logits = self._external_logits, None
        if logits is None or logits.shape[0] != self._active.numel():
            raise RuntimeError(
                f"{type(self).__name__} is in external (fused) mode but the decoder provided no history logits for "
                f"this step's {self._active.numel()} active row(s)."
            )
        return logits

    def _update_early_exit(self, log_hist: torch.Tensor, log_main: torch.Tensor) -> None:
        divergence = js_divergence(log_hist, log_main).cpu()
        active = self._active
        close = divergence < self.early_exit_epsilon
        streak = torch.where(close, self._streak[active] + 1, torch.zeros_like(self._streak[active]))
        self._streak[active] = streak
        exiting = active[streak >= self.early_exit_patience].tolist()
        for row in exiting:
            self.exit_steps[row] = self.steps
        self.deactivate(exiting)
