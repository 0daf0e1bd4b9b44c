"""Multiple-choice accuracy with lm-eval's conventions, computed with one forward per shared context.

Definitions (lm-eval 0.4.13, `ConfigurableTask.process_results` for output_type multiple_choice):
- each choice is scored as the summed log-prob of `target_delimiter + choice` given the question text,
  tokenized by `tokenization.encode_pair`;
- acc = [argmax_i ll_i == answer]; acc_norm = [argmax_i ll_i / len(choice_i) == answer] (characters of the
  choice without the delimiter); ties go to the first index (numpy argmax);
- acc_stderr = sample standard deviation (n - 1) / sqrt(n), lm-eval's `mean_stderr`.

Why it is fast: lm-eval runs context+choice once per choice. Here the context of a batch of questions runs once
(left-padded, explicit position ids), its KV cache is gathered once per choice, and all choices' tokens run in
one more forward over that cache. Only the last context position goes through the LM head. The sums agree with
lm-eval's to float rounding (padding and batching change the order of additions, nothing else).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from posttrain.errors import PosttrainError
from posttrain.eval.kv_cache import cache_kwargs, output_cache
from posttrain.eval.tokenization import encode_pair, model_max_length


@dataclass
class Question:
    context: str
    choices: list[str]
    answer: int


@dataclass
class ChoiceScores:
    """Per-question log-likelihoods, in the order of the questions given."""

    loglikelihoods: list[list[float]]
    questions: list[Question]

    def predictions(self, normalize: bool = False) -> list[int]:
        preds = []
        for lls, q in zip(self.loglikelihoods, self.questions):
            scores = np.array(lls)
            if normalize:
                scores = scores / np.array([float(len(c)) for c in q.choices])
            preds.append(int(np.argmax(scores)))
        return preds

    def items(self) -> list[dict]:
        """Per question: {"acc": 0/1, "acc_norm": 0/1, "choice": argmax, "choice_norm": length-normalized argmax}."""
        out = []
        for q, pick, pick_norm in zip(self.questions, self.predictions(), self.predictions(normalize=True)):
            out.append(
                {"acc": float(pick == q.answer), "acc_norm": float(pick_norm == q.answer), "choice": pick,
                 "choice_norm": pick_norm}
            )
        return out

    def metrics(self) -> dict[str, float]:
        items = self.items()
        acc, acc_norm = [i["acc"] for i in items], [i["acc_norm"] for i in items]
        return {
            "acc": mean(acc),
            "acc_stderr": mean_stderr(acc),
            "acc_norm": mean(acc_norm),
            "acc_norm_stderr": mean_stderr(acc_norm),
        }


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: list[float]) -> float:
    """lm-eval's `mean_stderr`: sample std (n - 1 denominator) / sqrt(n); NaN for a single value."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def questions_from_rows(rows: list[dict], source: str, origins: list[str] | None = None) -> list[Question]:
    """{"question" (or "context"): str, "choices": [str, ...], "answer": index} rows (tiny:multiple_choice's
    format) -> Questions; a bad row fails naming its origin (default: `source: row N`)."""
    out = []
    for i, row in enumerate(rows, 1):
        origin = origins[i - 1] if origins else f"{source}: row {i}"
        context = row.get("question", row.get("context"))
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2:
            raise PosttrainError(
                f"{origin}: the row needs 'question' (or 'context') text and a 'choices' list of >= 2 strings"
            )
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise PosttrainError(
                f"{origin}: 'answer' must be the index of the right choice (0..{len(choices) - 1}), got {answer!r}"
            )
        out.append(Question(context, [str(c) for c in choices], answer))
    return out


def score_choices(
    model,
    tokenizer,
    questions: list[Question],
    target_delimiter: str = " ",
    batch_size: int = 16,
    max_length: int | None = None,
    desc: str = "multiple choice",
) -> ChoiceScores:
    """Summed log p(delimiter + choice | context) for every choice of every question."""
    max_length = max_length or model_max_length(model)
    groups = []  # one per (question, context tokens): lm-eval's context ids are the same for every choice
    for qi, q in enumerate(questions):
        pairs = [encode_pair(tokenizer, q.context, target_delimiter + c) for c in q.choices]
        by_context: dict[tuple, list] = {}
        for ci, (ctx, cont) in enumerate(pairs):
            by_context.setdefault(tuple(ctx), []).append((ci, cont))
        groups += [(qi, list(ctx), conts) for ctx, conts in by_context.items()]
    groups.sort(key=lambda g: -len(g[1]))  # similar lengths share a batch: little padding
    lls = [[0.0] * len(q.choices) for q in questions]
    with torch.inference_mode():
        for start in tqdm(range(0, len(groups), batch_size), desc=desc, leave=False):
            batch = groups[start : start + batch_size]
            scores = _score_batch(
                model, [_truncate(ctx, conts, max_length) for _, ctx, conts in batch], [g[2] for g in batch]
            )
            for (qi, _, conts), group_scores in zip(batch, scores):
                for (ci, _), s in zip(conts, group_scores):
                    lls[qi][ci] = s
    return ChoiceScores(lls, questions)


def _truncate(ctx: list[int], conts: list, max_length: int) -> list[int]:
    # lm-eval keeps the last max_length + 1 tokens of context + continuation; here the longest choice decides.
    keep = max(1, max_length + 1 - max(len(c) for _, c in conts))  # at least one token to condition on
    return ctx[-keep:] if len(ctx) > keep else ctx


def _score_batch(model, contexts: list[list[int]], conts: list[list]) -> list[list[float]]:
    device = next(model.parameters()).device
    width = max(len(c) for c in contexts)
    ids = torch.zeros(len(contexts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, ctx in enumerate(contexts):  # left padding: every context ends at the same column
        ids[row, width - len(ctx) :] = torch.tensor(ctx)
        mask[row, width - len(ctx) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts every choice's first token
    scores = [[first[g, cont[0]].item() for _, cont in group] for g, group in enumerate(conts)]
    rows = [(g, k, cont) for g, group in enumerate(conts) for k, (_, cont) in enumerate(group) if len(cont) > 1]
    if rows:
        _score_rest(model, output_cache(out), mask, rows, scores)
    return scores


def _score_rest(model, cache, ctx_mask, rows, scores) -> None:
    """Tokens 2.. of each choice: one forward of all choices over the gathered context cache."""
    device = ctx_mask.device
    width = max(len(cont) - 1 for _, _, cont in rows)
    group_idx = torch.tensor([g for g, _, _ in rows], device=device)
    cache.reorder_cache(group_idx)  # gathers (and repeats) each context's keys/values for its choices
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    cont_mask = torch.zeros_like(ids)
    for r, (_, _, cont) in enumerate(rows):  # right padding: pads come after every scored position
        ids[r, : len(cont) - 1] = torch.tensor(cont[:-1])
        cont_mask[r, : len(cont) - 1] = 1
    ids, cont_mask = ids.to(device), cont_mask.to(device)
    ctx_mask = ctx_mask[group_idx]
    positions = ctx_mask.sum(-1, keepdim=True) + torch.arange(width, device=device)
    mask = torch.cat([ctx_mask, cont_mask], dim=-1)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache_kwargs(model, cache)
    ).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    for r, (g, k, cont) in enumerate(rows):
        targets = torch.tensor(cont[1:], device=device)
        scores[g][k] += logprobs[r, : len(cont) - 1].gather(-1, targets[:, None]).sum().item()
