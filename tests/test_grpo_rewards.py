"""The grpo recipe's parts without training: built-in rewards, prompt-only rows, and the rl section's checks."""

import math
from pathlib import Path

import pytest

from posttrain.config.schema import DataConfig, DataSource, RewardSpec, load_config
from posttrain.data.prompts import ORIGIN, normalize_prompts, prompt_examples
from posttrain.errors import PosttrainError
from posttrain.eval.rewards import CheckedReward, builtin_reward, last_number

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CHAT = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731 - TRL's conversational completion


def score(max_tokens=8, completion_ids=None, **spec):
    def call(completions, answers):
        reward = builtin_reward(RewardSpec(**spec), max_tokens)
        return reward(prompts=[""] * len(completions), completions=completions, completion_ids=completion_ids,
                      answer=answers)
    return call


def test_exact_numeric_and_regex_answers():
    assert score(function="exact_answer")([CHAT(" 42\n"), CHAT("42 apples"), "42"], ["42", "42", 42]) == [1, 0, 1]
    numeric = score(function="numeric_answer", tolerance=0.01)
    assert numeric([CHAT("so 1,000.004"), CHAT("it is 7 or 8"), CHAT("none")], ["1000", "7", "3"]) == [1, 0, 0]
    regex = score(function="regex_answer", pattern=r"<answer>(.*?)</answer>")
    assert regex([CHAT("x <answer>42</answer>"), CHAT("<answer>41</answer>"), CHAT("42")], ["42"] * 3) == [1, 0, 0]
    assert last_number("from -3 to .5") == 0.5


def test_gsm8k_reference_is_picked_out_by_answer_pattern():
    exact = score(function="exact_answer", answer_pattern=r"####\s*(.+)$")
    assert exact([CHAT("72"), CHAT("71")], ["48 + 24 = 72\n#### 72"] * 2) == [1, 0]
    with pytest.raises(PosttrainError, match="answer_pattern .* does not match the reference"):
        exact([CHAT("72")], ["no marker here"])


def test_math_verify_compares_mathematically():
    pytest.importorskip("math_verify")
    verify = score(function="math_verify", answer_pattern=r"####\s*(.+)$")
    completions = [CHAT(r"So the answer is $\boxed{\frac{1}{2}}$."), CHAT(r"$\boxed{0.5}$"), CHAT(r"$\boxed{2}$")]
    assert verify(completions, ["#### 1/2"] * 3) == [1, 1, 0]


def test_format_and_length_penalty():
    assert score(function="format", pattern=r"^\d+$")([CHAT("42"), CHAT("forty-two")], ["", ""]) == [1, 0]
    penalty = score(function="length_penalty", target_tokens=4, max_tokens=8, completion_ids=[[1] * 3, [1] * 6,
                                                                                             [1] * 8, [1] * 9])
    assert penalty([""] * 4, [""] * 4) == [0.0, -0.5, -1.0, -1.0]


def test_checked_reward_names_the_function_and_prompt():
    def picky(prompts, completions, **kwargs):
        return [1.0 / (len(c) - 2) for c in completions]  # "ab" divides by zero

    checked = CheckedReward(picky, 2, "picky", 1.0, None)
    origins = {ORIGIN: ["f.jsonl:1", "f.jsonl:2"]}
    with pytest.raises(PosttrainError, match=r"rl\.rewards\[2\]\.function \(picky\) raised ZeroDivisionError on "
                                             r"prompt 1 of the batch \(f\.jsonl:2\)"):
        checked(prompts=["p", "q"], completions=["abc", "ab"], **origins)
    returns_nan = CheckedReward(lambda prompts, completions, **kw: [0.0, math.inf], 0, "nan", 1.0, None)
    with pytest.raises(PosttrainError, match=r"returned inf for prompt 1 of the batch \(f\.jsonl:2\)"):
        returns_nan(prompts=["p", "q"], completions=["a", "b"], **origins)
    skips = CheckedReward(lambda prompts, completions, **kw: [None, 1], 0, "skips", 1.0, None)
    assert skips(prompts=["p", "q"], completions=["a", "b"], **origins) == [None, 1]  # None skips, as in TRL


def prompts_of(rows, **data):
    return normalize_prompts(rows, [f"f.jsonl:{i + 1}" for i in range(len(rows))],
                             DataConfig(train=[DataSource("f.jsonl")], **data), "train")


def test_prompt_rows_keep_their_columns():
    out = prompts_of([{"question": "2+2?", "answer": "4", "level": 1},
                      {"question": " ", "answer": "0", "level": 2}], columns={"prompt": "question"})
    assert out.rows == [{"prompt": "2+2?", "answer": "4", "level": 1}] and out.dropped == {"empty_prompt": 1}
    chat = prompts_of([{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}],
                      system_prompt="Be brief.")
    assert chat.rows == [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                          "answer": "4"}]  # a chat's final answer is the reference


@pytest.mark.parametrize("row, message", [
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     r"f\.jsonl:1: the prompt ends with an assistant turn"),
    ({"text": "q"}, r"f\.jsonl:1: an RL row needs 'prompt'"),
])
def test_bad_prompt_rows(row, message):
    with pytest.raises(PosttrainError, match=message):
        prompts_of([row])


def test_prompts_are_chats_and_long_ones_are_dropped(tiny_tokenizer, tmp_path):
    import json

    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "What is 2 + 2? " * 20, "answer": "4"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = load_config(CONFIGS / "tiny" / "grpo.yaml", [f"output_dir={tmp_path}/o", f"data.train={data}",
                                                       "data.eval=[]", "data.eval_fraction=0"])
    train, held, counts = prompt_examples(cfg, tiny_tokenizer)
    assert counts == {"format": "prompt", "rows": 1, "eval_rows": 0, "prompt_too_long": 1} and held is None
    assert train[0]["prompt"] == [{"role": "user", "content": "What is 2 + 2?"}]  # one user turn, as eval sends it
    assert train[0][ORIGIN] == f"{data}:1"
    wrong_column = load_config(CONFIGS / "tiny" / "grpo.yaml", [f"output_dir={tmp_path}/o", f"data.train={data}",
                                                                 "rl.rewards=[{function: exact_answer, column: sum}]"])
    with pytest.raises(PosttrainError, match=r"rl\.rewards\[0\]\.column: .* has no column 'sum'"):
        prompt_examples(wrong_column, tiny_tokenizer)


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=6"], r"train\.batch_size counts completions .* multiple of rl\.num_generations \(4\)"),
    (["rl.algorithm=rloo", "rl.loss_type=grpo"], r"rl\.loss_type is grpo's setting"),
    (["rl.num_generations=1"], r"rl\.num_generations must be >= 2"),
    (["rl.loss_type=grpoo"], r"did you mean 'grpo'"),
    (["rl.rewards=[{function: format}]"], r"rl\.rewards\[0\]\.pattern is required for format"),
    (["rl.rewards=[{function: format, pattern: '(('}]"], r"rl\.rewards\[0\]\.pattern is not a valid regular"),
    (["rl.rewards=[]"], r"rl\.rewards must name at least one reward"),
    (["rl.ternary=true", "adapter.method=lora"], r"adapter must be absent with rl\.ternary"),
    (["rl.ternary=true", "rl.beta=0.1"], r"rl\.beta must be 0 with rl\.ternary"),
])
def test_rl_section_checks(overrides, message, tmp_path):
    with pytest.raises(PosttrainError, match=message):
        load_config(CONFIGS / "tiny" / "grpo.yaml", [f"output_dir={tmp_path}", *overrides])
