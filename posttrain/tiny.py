"""An offline tiny model, tokenizer and task family, so tests and the demo never touch a hub.

The tokenizer is a byte-level BPE trained here on text this module generates; the model is a randomly
initialised Llama or Qwen2 with the same wiring as the real ones (so every code path is the real one).
The task family is addition (a two-digit number plus a one- or two-digit number), whose answers can be checked
exactly; one problem in eight is held out, so a model that scores on the test split has learned to add
(the carries), not memorized. A model this small learns the carries late and never perfectly, which leaves
the headroom a comparison of methods needs. The chat template is ChatML
*without* `{% generation %}` tags, on purpose: posttrain must derive loss masks for templates like that.

Config files refer to these as ``model.name_or_path: tiny:llama`` and ``data.train: tiny:chat``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.files import atomic_dir, check_output_folder

TINY_VERSION = 3
ARCHS = ("llama", "qwen2")
TASKS = ("chat", "prompt_completion", "text", "preference", "alpaca", "sharegpt", "multiple_choice", "verifiable")
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SYSTEM_PROMPT = "You are a careful calculator."
TRAIN_ROWS = 8000  # per fine-tuning format: enough for SFT to teach the chat format, small enough to tokenize fast
PRETRAIN_ROWS = 40000  # tiny:text's train split, the demo's pretraining corpus: the base learns to add from it
TEST_ROWS = 600  # held-out items: a difference of a few points between variants is testable


def cache_dir() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


# ----------------------------------------------------------------------------------------------------------
# The task family: a + b, with a held-out set that never appears in training.


def _problems(split: str, count: int) -> list[tuple[int, int]]:
    """`count` pairs (a, b), a in 10..99 and b in 1..99, in a fixed shuffled order. One pair in eight is held
    out by a fixed rule; the test split draws only from those, every train split only from the rest."""
    if split not in ("train", "test"):
        raise PosttrainError(f"tiny data has splits 'train' and 'test', not {split!r}")
    held_out = split == "test"
    pairs = [(a, b) for a in range(10, 100) for b in range(1, 100) if ((a * 7 + b * 13) % 8 == 0) == held_out]
    random.Random(f"tiny-problems-{split}").shuffle(pairs)
    return pairs[:count]


def _question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def _wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """A plausible wrong answer: the sum with its carries forgotten when it has any, else off by one or by ten."""
    digits, place, carried = 0, 1, False
    while a or b:
        digit = a % 10 + b % 10
        carried |= digit >= 10
        digits, place, a, b = digits + digit % 10 * place, place * 10, a // 10, b // 10
    return digits if carried else digits + rng.choice([-10, -1, 1, 10])


def _choices(a: int, b: int, rng: random.Random) -> tuple[list[str], int]:
    """Four distinct numbers, shuffled: the sum, the plausible wrong answer and two nearby numbers; the sum's index."""
    right = a + b
    options = [right, _wrong_answer(a, b, rng)]
    for delta in rng.sample([-10, -2, -1, 1, 2, 10], 6):
        if len(options) < 4 and right + delta not in options:
            options.append(right + delta)
    rng.shuffle(options)
    return [str(n) for n in options], options.index(right)


def tiny_rows(task: str, split: str = "train") -> list[dict]:
    """Rows of one task format; deterministic. Formats mirror the public datasets posttrain reads."""
    if task not in TASKS:
        raise PosttrainError(f"unknown tiny dataset 'tiny:{task}'; choose one of {', '.join(TASKS)}")
    rng = random.Random(f"{task}-{split}")
    pairs = _problems(split, TEST_ROWS if split == "test" else PRETRAIN_ROWS if task == "text" else TRAIN_ROWS)
    rng.shuffle(pairs)
    rows = []
    for i, (a, b) in enumerate(pairs):
        question, answer = _question(a, b), str(a + b)
        if task == "chat":
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if i % 2:
                messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
            rows.append({"messages": messages})
        elif task == "prompt_completion":
            rows.append({"prompt": question + " Answer:", "completion": " " + answer})
        elif task == "text":
            rows.append({"text": f"{question} It is {answer}."})
        elif task == "preference":
            wrong = str(_wrong_answer(a, b, rng))
            rows.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": wrong}],
                }
            )
        elif task == "multiple_choice":  # lm-eval's layout, as posttrain eval's multiple_choice reads it
            choices, index = _choices(a, b, rng)
            rows.append({"question": question, "choices": choices, "answer": index})
        elif task == "verifiable":  # prompt only, the answer in its own column: what RL with verifiable rewards reads
            rows.append({"prompt": [{"role": "user", "content": question}], "answer": answer})
        elif task == "alpaca":
            rows.append({"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": answer})
        else:  # sharegpt
            rows.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    return rows


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: every task's surface forms plus the chat markup."""
    lines = []
    for task in ("text", "prompt_completion", "alpaca"):
        for row in tiny_rows(task, "train"):
            lines.append(" ".join(str(v) for v in row.values()))
    for row in tiny_rows("chat", "train"):  # the chat markup as the template renders it
        lines.append("".join(f"{m['role']}\n{m['content']}\n" for m in row["messages"]))
    return lines * 2


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and model.


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    # Digits split one by one (as Llama 3 and Qwen2 do), so arithmetic is learnable digit by digit.
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=1024,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_model(tokenizer, arch: str = "llama", hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    if arch not in ARCHS:
        raise PosttrainError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    return model


def build_tiny(out_dir: str | Path, arch: str = "llama", overwrite: bool = False) -> Path:
    """Write a tiny model + tokenizer (with chat template) to out_dir, atomically. A non-empty out_dir is
    refused unless overwrite (it may hold anything: a finished run, the user's files), before any work."""
    out_dir = check_output_folder(out_dir, "out_dir", overwrite)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, arch)
    with atomic_dir(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out_dir


def resolve_tiny_model(spec: str) -> Path:
    """`tiny:llama` -> a cached folder holding the tiny model, built on first use."""
    arch = spec.split(":", 1)[1] or "llama"
    target = cache_dir() / f"tiny-{arch}-v{TINY_VERSION}"
    if not (target / "config.json").is_file():
        shutil.rmtree(target, ignore_errors=True)  # posttrain's own cache folder: a half-built one is rebuilt
        build_tiny(target, arch)
    return target
