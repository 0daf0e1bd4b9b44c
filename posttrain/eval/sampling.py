"""Sampling completions for RL (recipe: grpo): a lean decode loop over a KV cache.

Why not `model.generate`: an RL step samples a few short completions for every prompt, and on small models (and
on a host-bound GPU step) the cost of `generate` is its per-token machinery (logits processors, stopping
criteria, cache bookkeeping), not the forward. This loop does only what RL sampling needs:

- Each distinct prompt is encoded once: TRL's sampler repeats every prompt num_generations times in a row, so
  the prefill runs on the distinct prompts and their cache is gathered out to every completion (attention
  caches; a hybrid model's recurrent layers get every row prefilled instead).
- Only the last prompt position goes through the LM head (a 150k-token vocabulary over a 200-token prompt is
  most of a small model's prefill otherwise).
- The distribution is generate's: logits / temperature, then top-k, then top-p (the smallest set of tokens whose
  probability reaches top_p, at least one kept), then a draw from torch's global generator, so the sampling RNG
  state in a checkpoint reproduces the draws on resume.
- A completion ends at its first stop token (kept, as generate and TRL keep it) or at max_new_tokens; the loop
  ends when every row has stopped.
"""

from __future__ import annotations

import torch

from posttrain.eval.kv_cache import cache_kwargs, output_cache


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, in that order."""
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def distinct_prompts(prompt_ids: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """(the distinct prompts in first-seen order, for each row the index of its prompt among them)."""
    index: dict[tuple[int, ...], int] = {}
    rows = [index.setdefault(tuple(ids), len(index)) for ids in prompt_ids]
    return [list(key) for key in index], torch.tensor(rows)


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


# Cache layers that hold keys and values only, whose rows gather along the batch. Hybrid models' linear-attention
# layers also keep convolution and recurrent states that batch_select_indices leaves at the prefill's batch size.
GATHERABLE_LAYERS = {"DynamicLayer", "DynamicSlidingWindowLayer", "DynamicIndexedLayer"}


def gatherable(cache) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ in GATHERABLE_LAYERS for layer in layers)


def prefill(model, prompt_ids: list[list[int]], pad_id: int, device):
    """(the forward's output with its cache and the last position's logits, attention mask, position ids)."""
    ids, mask = left_pad(prompt_ids, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out, mask, positions


@torch.no_grad()
def sample_completions(model, prompt_ids: list[list[int]], *, max_new_tokens: int, stop_ids: list[int], pad_id: int,
                       temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0) -> list[list[int]]:
    """One sampled completion (token ids, through its first stop token) per row of prompt_ids."""
    device = next(model.parameters()).device
    distinct, row_prompt = distinct_prompts(prompt_ids)
    out, mask, positions = prefill(model, distinct, pad_id, device)
    cache = output_cache(out)
    if len(distinct) < len(prompt_ids) and not gatherable(cache):
        out, mask, positions = prefill(model, prompt_ids, pad_id, device)
        cache, row_prompt = output_cache(out), torch.arange(len(prompt_ids))
    elif len(distinct) < len(prompt_ids):
        cache.batch_select_indices(row_prompt.to(device))
    row_prompt = row_prompt.to(device)
    logits, mask, position = out.logits[row_prompt, -1], mask[row_prompt], positions[row_prompt, -1:]
    stops = torch.tensor(stop_ids, device=device)
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    tokens = []
    for step in range(max_new_tokens):
        probs = filter_logits(logits.float(), temperature, top_k, top_p).softmax(dim=-1)
        token = torch.multinomial(probs, 1).squeeze(1).masked_fill(done, pad_id)
        tokens.append(token)
        done |= torch.isin(token, stops)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(len(prompt_ids), 1)], dim=1)
        position = position + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position, use_cache=True,
                    **cache_kwargs(model, cache))
        cache, logits = output_cache(out), out.logits[:, -1]
    return completions_through_stop(torch.stack(tokens, dim=1).tolist(), set(stop_ids))


def completions_through_stop(rows: list[list[int]], stop_ids: set[int]) -> list[list[int]]:
    out = []
    for row in rows:
        end = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
        out.append(row[:end])
    return out
