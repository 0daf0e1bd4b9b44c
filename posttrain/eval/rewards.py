"""Rewards for RL with verifiable answers (recipe: grpo), called as TRL calls them:
f(prompts, completions, completion_ids=..., **columns) -> one float per completion.

Built-ins (rl.rewards[i].function), each 1.0 right / 0.0 wrong unless said otherwise:
- exact_answer: the completion, stripped, equals the reference (the eval module's exact_match, eval/generation.py)
- numeric_answer: the completion's last number is within `tolerance` of the reference's (commas ignored)
- regex_answer: `pattern`'s first group (or whole match) in the completion equals the reference; no match: 0
- format: `pattern` is found in the completion (re.search, DOTALL: anchor it with ^...$ to match the whole)
- length_penalty: 0 up to `target_tokens`, then falling linearly to -1 at rl.max_completion_length (DAPO's soft
  overlong penalty)
- math_verify: the math-verify package parses both and checks them equal (LaTeX, fractions, \\boxed{...})
The reference is the row's `column` (default answer); `answer_pattern` picks it out of a longer text (GSM8K's
"... #### 72": '#### (.+)$').

Every reward, built-in or yours, runs inside CheckedReward: a function that raises, returns the wrong number of
values, or returns NaN/inf/a non-number stops the run (a PosttrainError naming the function, its config key and
the prompt: its index in the batch and its data row). None skips a completion, as in TRL. Under DDP the
processes agree on the failure first (one all-reduce per call), so none waits forever for the others.
StepRewards records the weighted reward, averaged over every completion of each optimizer step and over all
processes, into the Trainer's log history (so checkpoints keep it): metrics.json's reward_history.
"""

from __future__ import annotations

import math
import re

import torch
from transformers import TrainerCallback

from posttrain.config.functions import BUILTIN_REWARDS, load_reward_function
from posttrain.data.prompts import ORIGIN
from posttrain.engine.checkpoints import any_process
from posttrain.errors import PosttrainError
from posttrain.eval.generation import generation_items

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
STEP_KEY = "reward_step_mean"  # the log-history key of StepRewards' per-step mean


def completion_text(completion) -> str:
    """A completion as text: TRL gives a string for text prompts, a list of messages for conversational ones."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def reference(value, answer_pattern: str | None) -> str:
    text = str(value).strip()
    if answer_pattern is None:
        return text
    found = re.search(answer_pattern, text, re.MULTILINE | re.DOTALL)
    if found is None:
        raise PosttrainError(f"answer_pattern {answer_pattern!r} does not match the reference {text[-200:]!r}")
    return (found.group(1) if found.re.groups else found.group(0)).strip()


def last_number(text: str) -> float | None:
    numbers = NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def exact_answer(spec, completions, answers) -> list[float]:
    rows = [{"answer": reference(a, spec.answer_pattern)} for a in answers]
    return [item["exact_match"] for item in generation_items([completion_text(c) for c in completions], rows)]


def numeric_answer(spec, completions, answers) -> list[float]:
    out = []
    for completion, answer in zip(completions, answers):
        expected = last_number(reference(answer, spec.answer_pattern))
        if expected is None:
            raise PosttrainError(f"numeric_answer: the reference {str(answer)[-100:]!r} holds no number")
        got = last_number(completion_text(completion))
        out.append(float(got is not None and abs(got - expected) <= spec.tolerance))
    return out


def regex_answer(spec, completions, answers) -> list[float]:
    extracted = []
    for completion in completions:
        found = re.search(spec.pattern, completion_text(completion), re.DOTALL)
        extracted.append(None if found is None else found.group(1) if found.re.groups else found.group(0))
    rows = [{"answer": reference(a, spec.answer_pattern)} for a in answers]
    scores = generation_items([e or "" for e in extracted], rows)
    return [0.0 if e is None else item["exact_match"] for e, item in zip(extracted, scores)]


def format_reward(spec, completions) -> list[float]:
    return [float(re.search(spec.pattern, completion_text(c), re.DOTALL) is not None) for c in completions]


def length_penalty(spec, completion_ids, max_tokens: int) -> list[float]:
    target = max_tokens // 2 if spec.target_tokens is None else spec.target_tokens
    span = max(max_tokens - target, 1)
    return [max(-1.0, min(0.0, (target - len(ids)) / span)) for ids in completion_ids]


def math_verify_reward(spec, completions, answers) -> list[float]:
    from math_verify import parse, verify

    out = []
    for completion, answer in zip(completions, answers):
        gold = parse(reference(answer, spec.answer_pattern))
        if not gold:
            raise PosttrainError(f"math_verify cannot parse the reference {str(answer)[-100:]!r}")
        out.append(float(verify(gold, parse(completion_text(completion)))))
    return out


def builtin_reward(spec, max_completion_length: int):
    """The built-in that spec names, as a TRL reward function."""
    def reward(prompts, completions, completion_ids=None, **columns):
        if spec.function == "format":
            return format_reward(spec, completions)
        if spec.function == "length_penalty":
            return length_penalty(spec, completion_ids, max_completion_length)
        answers = columns[spec.column]
        scorer = {"exact_answer": exact_answer, "numeric_answer": numeric_answer, "regex_answer": regex_answer,
                  "math_verify": math_verify_reward}[spec.function]
        return scorer(spec, completions, answers)

    reward.__name__ = spec.function
    return reward


class CheckedReward:
    """A reward function whose failures stop the run with the function, its key and the prompt named."""

    def __init__(self, function, index: int, name: str, weight: float, recorder: StepRewards | None):
        self.function, self.index, self.weight, self.recorder = function, index, weight, recorder
        self.key = f"rl.rewards[{index}].function"
        self.__name__ = name  # TRL logs rewards/<name>/mean

    def __call__(self, prompts, completions, **kwargs):
        origins = kwargs.pop(ORIGIN, None) or ["(row unknown)"] * len(prompts)
        try:
            values = list(self.function(prompts=prompts, completions=completions, **kwargs))
            failure = self._problem(values, len(prompts), origins)
        except Exception as err:  # noqa: BLE001 - any failure of a reward, the user's code included, stops the run
            failure = self._raised(err, prompts, completions, kwargs, origins)
            values = []
        if any_process([failure is not None], _device())[0]:
            raise PosttrainError(failure or f"{self.key} ({self.__name__}) failed on another process; its log says why")
        if self.recorder is not None:
            self.recorder.add(self.index == 0, values, self.weight)
        return values

    def _problem(self, values: list, expected: int, origins: list[str]) -> str | None:
        if len(values) != expected:
            return f"{self.key} ({self.__name__}) returned {len(values)} rewards for {expected} completions"
        for index, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return (f"{self.key} ({self.__name__}) returned {value!r} for prompt {index} of the batch "
                        f"({origins[index]}); a reward must be a finite number (or None to skip the completion)")
        return None

    def _raised(self, err, prompts, completions, kwargs, origins) -> str:
        """Which prompt makes the function raise: each is retried alone; the first that raises is named."""
        index = None
        for i in range(len(prompts)):
            alone = {k: [v[i]] if isinstance(v, list) and len(v) == len(prompts) else v for k, v in kwargs.items()}
            try:
                self.function(prompts=[prompts[i]], completions=[completions[i]], **alone)
            except Exception:  # noqa: BLE001 - looking for the one that fails
                index = i
                break
        where = f" on prompt {index} of the batch ({origins[index]})" if index is not None else ""
        return f"{self.key} ({self.__name__}) raised {type(err).__name__}{where}: {str(err)[:300]}"


class StepRewards(TrainerCallback):
    """The weighted reward summed over reward functions (TRL's default aggregation: a skipped reward adds 0),
    averaged over the step's completions on every process, logged per optimizer step as log_history's STEP_KEY."""

    def __init__(self):
        self.batches: list[list[float]] = []  # per generation batch: each completion's weighted sum so far

    def add(self, first: bool, values: list, weight: float) -> None:
        if first:  # TRL calls the rewards in order: the first one opens a generation batch
            self.batches.append([0.0] * len(values))
        for i, value in enumerate(values):
            self.batches[-1][i] += 0.0 if value is None else weight * float(value)

    def on_step_begin(self, args, state, control, **kwargs):
        self.batches = []  # an evaluation between steps scores rewards too: not this step's

    def on_step_end(self, args, state, control, **kwargs):
        totals = torch.tensor([sum(map(sum, self.batches)), float(sum(map(len, self.batches)))], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            totals = totals.to(_device())
            torch.distributed.all_reduce(totals)
        total, count = totals.tolist()
        if count:
            state.log_history.append({STEP_KEY: total / count, "step": state.global_step})
        return control


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def reward_functions(cfg, recorder: StepRewards | None = None) -> list[CheckedReward]:
    """rl.rewards as TRL reward functions, each checked (weights are applied by TRL through reward_weights)."""
    out = []
    for index, spec in enumerate(cfg.rl.rewards):
        if spec.function in BUILTIN_REWARDS:
            function, name = builtin_reward(spec, cfg.rl.max_completion_length), spec.function
        else:  # FILE.py:NAME or MODULE:NAME, found and checked when the config loaded
            function, name = load_reward_function(spec.function), spec.function.rpartition(":")[2]
        names = [r.__name__ for r in out]
        unique = name if name not in names else f"{name}_{index}"
        out.append(CheckedReward(function, index, unique, spec.weight, recorder))
    return out
