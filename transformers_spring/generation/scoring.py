"""Teacher-forced scoring: the per-token log-probabilities of given continuations under exactly what a planned
personalized decoding would use (each row's adapter, history and λ), mixed by SPRInG's one mixture
([`mix_logprobs`]). `SpringForCausalLM.score` validates its arguments, plans the rows and calls [`score_plan`]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..utils.compat import response_logits
from .adapters import AdapterRouter, activate_adapters
from .copying import build_copy_indexes, copy_logprobs
from .logits_process import entropy, mix_logprobs
from .planning import PersonalizationPlan

# A job: `(row, prefix token ids, adapter name or None)`.
Job = tuple[int, list[int], "str | None"]


def score_plan(
    model: nn.Module,
    plan: PersonalizationPlan,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    continuations: Sequence[Sequence[int]],
    copy_max_ngram: int = 4,
) -> list[torch.Tensor]:
    """Per row, `log(λ · p(c | history, prompt) + (1 − λ) · p(c | prompt))` token by token for the row's
    continuation `c`. A closed gate (λ = 0 or no history) scores the parametric path alone, λ = 1 the history path
    alone, so only the paths that count are computed. A row with a copy path (μ > 0) then mixes it in token by token,
    `log((1 − μ) · p_spring + μ · p_copy(· | prompt + c[:t]))` ([`copy_logprobs`], what decoding does).

    Args:
        model (`nn.Module`): the (adapted) model.
        plan ([`PersonalizationPlan`]): the rows' plan (None rows: the model alone).
        input_ids (`torch.Tensor` of shape `(batch, seq)`): the left-padded prompts.
        attention_mask (`torch.Tensor` of shape `(batch, seq)`): their mask.
        continuations (sequence of sequences of `int`): per row, the token ids to score.
        copy_max_ngram (`int`, *optional*, defaults to 4): `SpringConfig.copy_max_ngram`.

    Returns:
        `list[torch.Tensor]`: per row, a float32 tensor of `len(continuations[row])` log-probabilities.
    """
    device = getattr(model, "device", input_ids.device)
    # Two kinds of teacher-forced sequences: prompt + continuation (the parametric path) and history prompt +
    # continuation (the history path), each row on its own adapter, batched by length (see path_logprobs).
    main_jobs: list[Job] = []
    hist_jobs: list[Job] = []
    for index, info in enumerate(plan.rows):
        name = plan.names[index] if plan.names is not None else None
        open_gate = info is not None and info.gate_open and info.weight > 0
        if not (open_gate and info.weight >= 1):  # λ = 1: the mixture is the history path alone
            prompt = input_ids[index][attention_mask[index].bool()].tolist()
            main_jobs.append((index, prompt, name))
        if open_gate:
            hist_jobs.append((index, list(info.history_ids), name))
    # The per-token adaptive λ needs each position's full next-token entropy on both paths, not only the gold
    # token's log-probability: computed only when a mixed row asks for it.
    adaptive = any(
        info is not None and info.adaptive_weight > 0 and 0 < info.weight < 1 and info.gate_open for info in plan.rows
    )
    main_entropy: dict[int, torch.Tensor] | None = {} if adaptive else None
    hist_entropy: dict[int, torch.Tensor] | None = {} if adaptive else None
    log_main = path_logprobs(model, main_jobs, continuations, plan.router, device, entropies=main_entropy)
    log_hist = path_logprobs(model, hist_jobs, continuations, plan.router, device, entropies=hist_entropy)
    scores = []
    for index, info in enumerate(plan.rows):
        mixed = index in log_hist
        beta = info.adaptive_weight if mixed else 0.0
        scores.append(
            mix_logprobs(
                log_hist.get(index), log_main.get(index), info.weight if mixed else 0.0, adaptive_weight=beta,
                entropy_hist=hist_entropy.get(index) if hist_entropy is not None else None,
                entropy_main=main_entropy.get(index) if main_entropy is not None else None,
            )
        )  # fmt: skip
    for index, copy_index in enumerate(build_copy_indexes(plan.rows, copy_max_ngram)):
        if copy_index is not None:
            prompt = input_ids[index][attention_mask[index].bool()].tolist()
            weight = plan.rows[index].copy_weight
            scores[index] = copy_logprobs(scores[index], copy_index, weight, prompt, continuations[index])
    return scores


def path_logprobs(
    model: nn.Module,
    jobs: Sequence[Job],
    continuations: Sequence[Sequence[int]],
    router: AdapterRouter | None,
    device: torch.device,
    max_tokens: int = 4096,
    entropies: dict[int, torch.Tensor] | None = None,
) -> dict[int, torch.Tensor]:
    """log p(continuation | prefix) token by token for `jobs`, from teacher-forced forwards of right-padded batches of
    similar length (at most `max_tokens` padded tokens each), every row routed to its adapter. Only the positions that
    predict a continuation token go through the LM head where the model allows it (`compat.response_logits`).
    Given a dict as `entropies`, it is filled with each row's per-position next-token entropy (nats)."""
    out: dict[int, torch.Tensor] = {}
    order = sorted(jobs, key=lambda job: len(job[1]) + len(continuations[job[0]]))
    start = 0
    while start < len(order):
        width = len(order[start][1]) + len(continuations[order[start][0]])
        stop = start + 1
        while stop < len(order):  # sorted by length: the last row of a chunk is its widest
            longest = len(order[stop][1]) + len(continuations[order[stop][0]])
            if longest * (stop - start + 1) > max_tokens:
                break
            width, stop = longest, stop + 1
        chunk, start = order[start:stop], stop
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        keep = torch.zeros((len(chunk), width), dtype=torch.bool)
        targets: list[int] = []
        for r, (index, prefix, _) in enumerate(chunk):
            sequence = list(prefix) + list(continuations[index])
            ids[r, : len(sequence)] = torch.tensor(sequence)
            mask[r, : len(sequence)] = 1
            keep[r, len(prefix) - 1 : len(sequence) - 1] = True
            targets += continuations[index]
        names = [name for _, _, name in chunk] if chunk[0][2] is not None else None
        with activate_adapters(router, names):
            logits = response_logits(model, ids.to(device), mask.to(device), keep.to(device)).float()
        target = torch.tensor(targets, dtype=torch.long, device=logits.device)
        full = torch.log_softmax(logits, dim=-1)
        sizes = [len(continuations[i]) for i, _, _ in chunk]
        pieces = full.gather(-1, target[:, None])[:, 0].cpu().split(sizes)
        for (index, _, _), piece in zip(chunk, pieces, strict=True):
            out[index] = piece
        if entropies is not None:
            for (index, _, _), piece in zip(chunk, entropy(full).cpu().split(sizes), strict=True):
                entropies[index] = piece
    return out
