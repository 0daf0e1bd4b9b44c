"""Loss masks checked token by token, on templates WITHOUT {% generation %} tags."""

import pytest

from posttrain.data.formats import Rows
from posttrain.data.sft_tokenize import IGNORE, chat_example, special_ids, tokenize_rows
from posttrain.errors import PosttrainError

CONVERSATION = [
    {"role": "system", "content": "You are a careful calculator."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "19"},
    {"role": "user", "content": "And 3 + 4?"},
    {"role": "assistant", "content": "It is 7."},
]


def supervised_runs(tokenizer, example):
    """Contiguous supervised token runs, decoded; plus the tokens just outside each run."""
    runs, current = [], []
    for i, label in enumerate(example["labels"]):
        if label != IGNORE:
            assert label == example["input_ids"][i]
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_chatml_without_generation_tags_supervises_exactly_assistant_and_end_of_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    assert "{% generation %}" not in tok.chat_template
    example = chat_example(tok, CONVERSATION, 0, "row", special_ids(tok))
    runs = supervised_runs(tok, example)
    ids = example["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [tok.decode([ids[i] for i in run]) for run in runs] == ["19<|im_end|>", "It is 7.<|im_end|>"]
    for run, content in zip(runs, ["19", "It is 7."]):
        assert [ids[i] for i in run] == tok(content, add_special_tokens=False)["input_ids"] + [im_end]
        assert tok.decode(ids[run[0] - 3: run[0]]).endswith("assistant\n")  # the header is not supervised
        assert tok.decode([ids[run[-1] + 1]]) == "\n"  # nor the template's newline after <|im_end|>
    assert sum(label != IGNORE for label in example["labels"]) == sum(len(r) for r in runs)


def test_prompt_turns_are_not_trained_for_conversational_prompt_completion(tiny_tokenizer):
    example = chat_example(tiny_tokenizer, CONVERSATION, 3, "row", special_ids(tiny_tokenizer))
    runs = supervised_runs(tiny_tokenizer, example)
    assert [tiny_tokenizer.decode([example["input_ids"][i] for i in r]) for r in runs] == ["It is 7.<|im_end|>"]


def test_template_with_eos_and_plain_headers(tiny_tokenizer):
    tok = tiny_tokenizer
    tok = tok.__class__.from_pretrained(tok.name_or_path)
    tok.chat_template = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] + eos_token }}\n\n{% endfor %}"
                         "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    example = chat_example(tok, CONVERSATION[1:3], 0, "row", special_ids(tok))
    runs = supervised_runs(tok, example)
    assert [tok.decode([example["input_ids"][i] for i in r]) for r in runs] == ["19<|endoftext|>"]


def test_template_without_special_end_token_trims_whitespace(tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    example = chat_example(tok, CONVERSATION[1:3], 0, "row", special_ids(tok))
    runs = supervised_runs(tok, example)
    assert [tok.decode([example["input_ids"][i] for i in r]) for r in runs] == ["19"]  # not the newline after
    # " is" is one token straddling the prompt/answer boundary: supervised, since it holds the answer.
    turns = [CONVERSATION[1], {"role": "assistant", "content": "is"}]
    example = chat_example(tok, turns, 0, "row", special_ids(tok))
    runs = supervised_runs(tok, example)
    assert [tok.decode([example["input_ids"][i] for i in r]) for r in runs] == [" is"]


def test_matches_transformers_generation_mask_when_tags_exist(tiny_tokenizer):
    """Independent check: the same template WITH generation tags, masked by transformers itself."""
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tagged = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
              "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}{{- '\\n' }}"
              "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    ours = chat_example(tiny_tokenizer, CONVERSATION, 0, "row", special_ids(tiny_tokenizer))
    theirs = tok.apply_chat_template(CONVERSATION, chat_template=tagged, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert theirs["input_ids"] == ours["input_ids"]
    assert [int(label != IGNORE) for label in ours["labels"]] == theirs["assistant_masks"]


def test_empty_masks_are_counted_not_trained(tiny_tokenizer):
    rows = Rows(rows=[{"messages": CONVERSATION[:2], "train_from": 0},  # no assistant turn
                      {"messages": CONVERSATION, "train_from": 0}], origins=["a:1", "a:2"], format="messages")
    out = tokenize_rows(tiny_tokenizer, rows, max_length=1024)
    assert out.counts == {"rows": 2, "truncated": 0, "empty_mask": 1} and len(out.examples) == 1
    with pytest.raises(PosttrainError, match="all 1 rows have an empty loss mask"):
        tokenize_rows(tiny_tokenizer, Rows(rows=rows.rows[1:], origins=["a:2"], format="messages"), max_length=10)


def test_truncation_is_counted(tiny_tokenizer):
    rows = Rows(rows=[{"text": "1 plus 2 equals 3. " * 20}], origins=["t:1"], format="text")
    out = tokenize_rows(tiny_tokenizer, rows, max_length=16)
    assert out.counts["truncated"] == 1 and len(out.examples[0]["input_ids"]) == 16


def test_train_on_all(tiny_tokenizer):
    rows = Rows(rows=[{"messages": CONVERSATION, "train_from": 0}], origins=["a:1"], format="messages")
    out = tokenize_rows(tiny_tokenizer, rows, max_length=1024, train_on="all")
    assert out.examples[0]["labels"] == out.examples[0]["input_ids"]


def test_preference_rows_are_refused_by_sft(tiny_tokenizer):
    rows = Rows(rows=[{"prompt": "a", "chosen": "b", "rejected": "c"}], origins=["p:1"], format="preference")
    with pytest.raises(PosttrainError, match="recipe: dpo"):
        tokenize_rows(tiny_tokenizer, rows, max_length=64)
