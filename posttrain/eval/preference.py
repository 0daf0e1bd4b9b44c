"""DPO's implicit-reward metrics on held-out preference pairs, with TRL 1.16's definitions.

reward(y) = beta * (log pi(y | x) - log pi_ref(y | x)), log-probs summed over the completion tokens.
accuracy = mean(reward(chosen) > reward(rejected)) (strict: a tie counts as wrong, so a model compared with
itself scores 0); margin = mean(reward(chosen) - reward(rejected)).

Rows are read and tokenized by the DPO recipe's own code (posttrain.data.sources.normalize, posttrain.data.preference.
tokenize_pairs), which follows TRL's DPOTrainer: plain text gets EOS appended to each completion (unless already
there) and is tokenized as prompt, prompt+chosen, prompt+rejected; conversational rows (message lists) go
through the chat template (the prompt with the generation prompt). The completion starts where the tokenized
prompt and the tokenized prompt+completion first differ, because BPE merges or templates can change the
prompt's last tokens.
"""

from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from posttrain.config.schema import DataConfig
from posttrain.data.formats import Rows, normalize
from posttrain.data.preference import tokenize_pairs
from posttrain.errors import PosttrainError
from posttrain.eval.multiple_choice import mean, mean_stderr
from posttrain.eval.tokenization import prefix_token_id


def as_pairs(rows: list[dict], origins: list[str] | None = None) -> Rows:
    """Raw preference rows -> normalized Rows, as the DPO recipe reads them (posttrain.data.sources.normalize):
    explicit, conversational, implicit-prompt and UltraFeedback shapes; bad rows fail naming their origin;
    pairs whose chosen equals rejected are dropped (counted in `dropped`)."""
    origins = origins or [f"preference row {i}" for i in range(1, len(rows) + 1)]
    return normalize(rows, origins, DataConfig(format="preference"), "eval")


def completion_logps(
    model, sequences: list[tuple[list[int], list[int]]], batch_size: int = 8, desc: str = "logps"
) -> list[float]:
    """Summed log p(completion | prompt) for each (prompt ids, completion ids)."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    out = [0.0] * len(sequences)
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start : start + batch_size]
            width = max(sum(map(len, sequences[i])) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):  # right padding: causal, so pads never reach a scored position
                prompt, completion = sequences[i]
                ids[row, : len(prompt) + len(completion)] = torch.tensor(prompt + completion)
            logits = model(input_ids=ids.to(device)).logits
            for row, i in enumerate(idx):
                prompt, completion = sequences[i]
                scored = logits[row, len(prompt) - 1 : len(prompt) + len(completion) - 1].float()
                target = torch.tensor(completion, device=logits.device)[:, None]
                out[i] = torch.log_softmax(scored, dim=-1).gather(-1, target).sum().item()
    return out


def preference_items(policy_logps: list[float], reference_logps: list[float], beta: float) -> list[dict[str, float]]:
    """Per pair: {"accuracy": 0/1 (strict chosen > rejected, as TRL), "margin", "reward_chosen", "reward_rejected"};
    policy/reference logps interleaved as [chosen_0, rejected_0, chosen_1, ...]."""
    rewards = [beta * (p - r) for p, r in zip(policy_logps, reference_logps)]
    return [
        {"accuracy": float(c > r), "margin": c - r, "reward_chosen": c, "reward_rejected": r}
        for c, r in zip(rewards[0::2], rewards[1::2])
    ]


def preference_metrics(policy_logps: list[float], reference_logps: list[float], beta: float) -> dict[str, float]:
    """policy/reference logps interleaved as [chosen_0, rejected_0, chosen_1, ...]."""
    items = preference_items(policy_logps, reference_logps, beta)
    wins = [i["accuracy"] for i in items]
    return {
        "accuracy": mean(wins),
        "accuracy_stderr": mean_stderr(wins),
        "margin": mean([i["margin"] for i in items]),
        "reward_chosen": mean([i["reward_chosen"] for i in items]),
        "reward_rejected": mean([i["reward_rejected"] for i in items]),
    }


def pair_sequences(
    tokenizer, rows: Rows | list[dict], max_length: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """[(prompt, chosen), (prompt, rejected), ...] in the interleaved order `preference_metrics` expects."""
    return kept_pair_sequences(tokenizer, rows, max_length)[0]


def kept_pair_sequences(
    tokenizer, rows: Rows | list[dict], max_length: int | None = None
) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """(sequences as `pair_sequences` gives them, the index in `rows` of each pair kept).

    Tokenized by posttrain.data.preference.tokenize_pairs, the DPO recipe's own function, so eval and training agree
    on which tokens are the completion; pairs longer than `max_length` keep their start, pairs whose prompt
    alone fills it are left out (both counted, with a warning).
    """
    rows = as_pairs(rows) if isinstance(rows, list) else rows
    max_length = max_length or 10**9
    pairs, counts = tokenize_pairs(tokenizer, rows, max_length)
    kept = list(range(len(rows.rows)))
    skipped = {k: v for k, v in counts.items() if k != "pairs" and v}
    if skipped:
        warnings.warn(f"preference: {counts['pairs']} pairs, of which {skipped}", stacklevel=2)
    if counts["prompt_too_long"]:
        # tokenize_pairs leaves out the pairs whose prompt alone fills max_length; untruncated ids say which.
        full, _ = tokenize_pairs(tokenizer, rows, 10**9)
        kept = [i for i, pair in enumerate(full) if len(pair["prompt_ids"]) < max_length]
    seqs = []
    for pair in pairs:
        prompt, chosen, rejected = pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
        if not chosen or not rejected:
            raise PosttrainError(
                f"a preference pair has an empty completion after tokenization (prompt ending "
                f"{tokenizer.decode(prompt)[-60:]!r})"
            )
        # An empty prompt still needs one token to condition the first completion token on (lm-eval's choice).
        prompt = prompt or [prefix_token_id(tokenizer)]
        seqs += [(prompt, chosen), (prompt, rejected)]
    return seqs, kept
