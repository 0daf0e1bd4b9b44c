"""Prompt-only rows for RL with verifiable rewards: what the model is asked, and the columns its answers are
checked against.

    {"prompt": "What is 37 + 5?", "answer": "42"}                                  a plain prompt
    {"prompt": [{"role": "user", "content": "What is 37 + 5?"}], "answer": "42"}    a conversational prompt
    {"messages": [{"role": "user", ...}, {"role": "assistant", "content": "42"}]}   a chat: its final assistant
                                                                                    turn is the answer

Every column besides the prompt is kept as it is and reaches the reward functions as a keyword argument (TRL's
convention), so a dataset's `answer`, `solution` or test cases are available to them; data.columns renames
(e.g. {prompt: question}). With a tokenizer that has a chat template, a text prompt becomes one user turn (as
posttrain eval sends it), so an instruct model is asked the way it was tuned; data.system_prompt is prepended
to conversational prompts. A prompt that leaves no
room for the completion (prompt tokens + rl.max_completion_length > train.max_length) is dropped and counted, as
is one with a blank prompt or user turn.
"""

from __future__ import annotations

from posttrain.data.formats import Rows, load_splits, parse_messages, rename_columns
from posttrain.errors import PosttrainError

ORIGIN = "posttrain_origin"  # the row's file:line, for a reward's error; the reward wrapper hides it from rewards
ANSWER_REWARDS = ("exact_answer", "numeric_answer", "regex_answer", "math_verify")  # read RewardSpec.column


def prompt_row(row: dict, origin: str, system_prompt: str | None) -> dict:
    """One raw row -> {"prompt": str | [messages], **its other columns}."""
    extra = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
    if "prompt" in row and isinstance(row["prompt"], str):
        return {"prompt": row["prompt"], **extra}
    if "prompt" in row:
        messages = parse_messages(row["prompt"], origin, "prompt")
        if messages[-1]["role"] == "assistant":
            raise PosttrainError(f"{origin}: the prompt ends with an assistant turn; RL rows hold only the prompt "
                                 "(put the reference answer in its own column, e.g. 'answer')")
    elif "messages" in row:
        messages = parse_messages(row["messages"], origin, "messages")
        if messages[-1]["role"] == "assistant":  # a chat's final answer is the reference, unless a column says it
            extra.setdefault("answer", messages[-1]["content"])
            messages = messages[:-1]
        if not messages:
            raise PosttrainError(f"{origin}: 'messages' holds only an assistant turn; there is no prompt")
    else:
        raise PosttrainError(f"{origin}: an RL row needs 'prompt' (text or messages) or 'messages'; found "
                             f"{sorted(row)[:50]} (map yours with data.columns, e.g. {{prompt: question}})")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return {"prompt": messages, **extra}


def as_chat(row: dict, system_prompt: str | None) -> dict:
    if not isinstance(row["prompt"], str):
        return row
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return {**row, "prompt": system + [{"role": "user", "content": row["prompt"]}]}


def _blank_prompt(prompt) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    return any(m["role"] == "user" and not m["content"].strip() for m in prompt)


def normalize_prompts(rows: list[dict], origins: list[str], cfg, label: str) -> Rows:
    """load_splits' normalizer for prompt-only rows (signature of posttrain.data.formats.normalize)."""
    rows = rename_columns(rows, origins, cfg, label)
    out = Rows([], [], "prompt")
    for row, origin in zip(rows, origins):
        normalized = prompt_row(row, origin, cfg.system_prompt)
        if _blank_prompt(normalized["prompt"]):
            out.dropped["empty_prompt"] = out.dropped.get("empty_prompt", 0) + 1
            continue
        out.rows.append(normalized)
        out.origins.append(origin)
    if not out.rows:
        raise PosttrainError(f"data.{label}: no rows left after filtering ({out.dropped}); check the data")
    return out


def prompt_tokens(tokenizer, prompt) -> int:
    if isinstance(prompt, str):
        return len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                             return_dict=True)["input_ids"])


def _fitting(rows: Rows, tokenizer, room: int) -> tuple[list[dict], int]:
    """Rows whose prompt leaves max_completion_length tokens of train.max_length, each with its origin; the
    count of the others."""
    kept = [{**row, ORIGIN: origin} for row, origin in zip(rows.rows, rows.origins)
            if prompt_tokens(tokenizer, row["prompt"]) <= room]
    return kept, len(rows.rows) - len(kept)


def check_reward_columns(rows: list[dict], rewards, origin: str) -> None:
    for index, spec in enumerate(rewards):
        if spec.function in ANSWER_REWARDS and spec.column not in rows[0]:
            raise PosttrainError(f"rl.rewards[{index}].column: {origin} has no column {spec.column!r} for "
                                 f"{spec.function}; its columns: {sorted(k for k in rows[0] if k != ORIGIN)[:50]}")


def prompt_examples(cfg, tokenizer) -> tuple[object, object | None, dict]:
    """(train, eval) as datasets.Dataset of prompt rows (eval None without held-out rows), and the data counts
    that go into metrics.json."""
    from datasets import Dataset

    train_rows, eval_rows = load_splits(cfg.data, cfg.train.seed, normalize_prompts)
    room = cfg.train.max_length - cfg.rl.max_completion_length
    if room < 1:
        raise PosttrainError(f"train.max_length ({cfg.train.max_length}) must exceed rl.max_completion_length "
                             f"({cfg.rl.max_completion_length}): it holds the prompt and the completion")
    conversational = [r for r in train_rows.rows if not isinstance(r["prompt"], str)]
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise PosttrainError(f"{train_rows.origins[0]}: conversational prompts need a tokenizer with a chat template "
                             "(set model.chat_template)")
    if getattr(tokenizer, "chat_template", None):  # a text prompt is one user turn, as posttrain eval sends it
        for rows in filter(None, (train_rows, eval_rows)):
            rows.rows = [as_chat(row, cfg.data.system_prompt) for row in rows.rows]
    train, too_long = _fitting(train_rows, tokenizer, room)
    if not train:
        raise PosttrainError(f"data.train: every prompt is longer than train.max_length - rl.max_completion_length "
                             f"({room} tokens); raise train.max_length")
    check_reward_columns(train, cfg.rl.rewards, train_rows.origins[0])
    held = _fitting(eval_rows, tokenizer, room)[0] if eval_rows else []
    counts = {"format": "prompt", "rows": len(train), **train_rows.dropped, "eval_rows": len(held)}
    if too_long:
        counts["prompt_too_long"] = too_long
    return Dataset.from_list(train), Dataset.from_list(held) if held else None, counts
