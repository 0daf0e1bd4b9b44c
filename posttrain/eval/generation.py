"""Greedy generation scored by exact match and containment.

Prompts: a row's `messages` (a chat) or `prompt` (text, sent as one user turn); a chat row without `answer`
ending in an assistant message uses that message as the answer and the rest as the prompt. With
`chat_template: true` and a tokenizer that has a template, the chat is rendered with the generation prompt; the
template already holds any BOS, so the rendered text is tokenized without adding special tokens. Without a
template the prompt text is tokenized as is (a `messages` row then is an error: there is no faithful way to
render it).

exact_match = [strip(output) == strip(answer)]; contains = [strip(answer) in output]; with a list of answers,
any of them counts. Output = the new tokens decoded without special tokens, cut at the first stop token (the
tokenizer's EOS or any of the model's generation_config.eos_token_id, e.g. a chat model's end-of-turn token).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from posttrain.data.formats import parse_messages
from posttrain.errors import PosttrainError
from posttrain.eval.multiple_choice import mean, mean_stderr


def generation_rows(rows: list[dict], origins: list[str]) -> list[dict]:
    """Rows as {"prompt": str | "messages": [...], "answer": ...}. A chat row without "answer" whose last message
    is the assistant's (tiny:chat, any messages dataset) is split: the messages before it are the prompt, its
    content is the answer. Message lists are checked by posttrain.data.sources.parse_messages."""
    out = []
    for row, origin in zip(rows, origins):
        messages = parse_messages(row["messages"], origin, "messages") if "messages" in row else None
        if "answer" in row:
            answer = row["answer"]
        elif messages and len(messages) > 1 and messages[-1]["role"] == "assistant":
            messages, answer = messages[:-1], messages[-1]["content"]
        else:
            raise PosttrainError(
                f"{origin}: a generation row needs 'answer', or 'messages' ending in the assistant's answer"
            )
        if messages is not None:
            out.append({"messages": messages, "answer": answer})
        elif "prompt" in row:
            out.append({"prompt": row["prompt"], "answer": answer})
        else:
            raise PosttrainError(f"{origin}: a generation row needs 'prompt' (text) or 'messages' (a chat)")
    return out


def build_prompts(tokenizer, rows: list[dict], use_template: bool, origins: list[str]) -> tuple[list[str], bool]:
    """(prompt texts, whether tokenizing them should add special tokens): one answer for the whole task."""
    has_template = use_template and bool(getattr(tokenizer, "chat_template", None))
    texts = []
    for row, origin in zip(rows, origins):
        if "messages" in row and not has_template:
            raise PosttrainError(
                f"{origin}: the row has 'messages': that needs a tokenizer with a chat template and chat_template: true"
            )
        if not has_template:
            texts.append(row["prompt"])
            continue
        chat = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    return texts, not has_template


def generate_greedy(
    model,
    tokenizer,
    prompts: list[str],
    add_special_tokens: bool,
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generation",
) -> list[str]:
    device = next(model.parameters()).device
    outputs = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column, so pads go left
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
            ).to(device)
            with torch.inference_mode():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stop_ids(model, tokenizer),
                )
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx, texts):
                outputs[i] = text
    finally:
        tokenizer.padding_side = side
    return outputs


def stop_ids(model, tokenizer) -> list[int]:
    """Where generation stops: the tokenizer's EOS and the model's own stop tokens (chat models list their
    end-of-turn token, e.g. <|im_end|>, in generation_config.eos_token_id)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [tokenizer.eos_token_id, *configured] if i is not None})


def generation_items(outputs: list[str], rows: list[dict]) -> list[dict[str, float]]:
    """Per item: {"exact_match": 0/1, "contains": 0/1}, in the order of the rows."""
    items = []
    for out, row in zip(outputs, rows):
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        answers = [str(a).strip() for a in answers]
        exact, contains = any(out.strip() == a for a in answers), any(a in out for a in answers)
        items.append({"exact_match": float(exact), "contains": float(contains)})
    return items


def generation_metrics(outputs: list[str], rows: list[dict]) -> dict[str, float]:
    items = generation_items(outputs, rows)
    exact, contains = [i["exact_match"] for i in items], [i["contains"] for i in items]
    return {
        "exact_match": mean(exact),
        "exact_match_stderr": mean_stderr(exact),
        "contains": mean(contains),
        "contains_stderr": mean_stderr(contains),
    }
