"""The grpo recipe (GRPO and RLOO) on the tiny model: the reward climbs and the weights move, full, LoRA (reference
= adapter disabled) and 1.58-bit ternary (exported as BitNet); rewards that fail stop the run naming the function
and the prompt; a killed run resumes to the same weights bit for bit; it runs under --nproc 2.

The tiny configs reward answering with digits (weight 0.2) besides the exact sum: an untrained model is never
exactly right, so that is the reward whose rise these tests see."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import posttrain
from posttrain.config.schema import load_config
from posttrain.engine.run_dir import is_complete
from posttrain.errors import PosttrainError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
NO_EVAL = ["data.eval=[]", "data.eval_fraction=0"]


def run_tiny(name: str, out: Path, *overrides):
    cfg = load_config(CONFIGS / "tiny" / f"{name}.yaml", [f"output_dir={out}", *overrides])
    return posttrain.run(cfg)


def rewards(metrics: dict) -> list[float]:
    return [reward for _, reward in metrics["reward_history"]]


def changed_parameters(out: Path, start: Path) -> list[str]:
    trained, base = load_file(out / "model.safetensors"), load_file(start / "model.safetensors")
    return [name for name in base if not torch.equal(trained[name], base[name])]


@pytest.mark.parametrize("algorithm, beta", [("grpo", 0.0), ("rloo", 0.05)])
def test_full_model_reward_rises_and_weights_move(algorithm, beta, tmp_path, tiny_model_dir):
    out = tmp_path / algorithm
    suite = CONFIGS / "eval" / "tiny-train.yaml"
    metrics = run_tiny(algorithm, out, "train.max_steps=30", f"rl.beta={beta}", f"evaluate.suite={suite}",
                       "evaluate.every_steps=15", "evaluate.limit=8")
    assert is_complete(out) and json.loads((out / "metrics.json").read_text())["reward_history"] == \
        [list(entry) for entry in metrics["reward_history"]]
    history = rewards(metrics)
    assert [step for step, _ in metrics["reward_history"]] == list(range(1, 31))  # one mean per optimizer step
    assert sum(history[-10:]) / 10 > sum(history[:10]) / 10 + 0.05, history
    assert metrics["reward_functions_last"]["rewards/format/mean"] > 0.25  # ~0.2 untrained: digits by chance
    assert len(changed_parameters(out, Path(tiny_model_dir))) == len(load_file(out / "model.safetensors"))
    assert metrics["trained_tokens"] > 0
    if beta:  # the KL term against a frozen copy of the starting model
        assert metrics["reference"] == "a frozen copy of the starting model" and metrics["kl_last"] > 0
    else:
        assert metrics["reference"].startswith("none") and metrics["kl_last"] is None
    assert "eval_reward" in metrics["eval"]  # the held-out prompts, sampled and scored like the training ones
    assert [entry["step"] for entry in metrics["eval_history"]] == [15, 30]  # evaluate: held-out exact match
    assert "gen/add/exact_match" in metrics["eval_history"][-1]


def test_lora_uses_the_adapter_disabled_model_as_reference(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    metrics = run_tiny("grpo", out, "train.max_steps=24", "adapter.method=lora", "rl.beta=0.1",
                       "train.learning_rate=1.0e-2", *NO_EVAL)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert metrics["reference"] == "the model with the adapter disabled"
    assert metrics["kl_last"] > 0  # the policy moved away from its adapter-free self
    base = AutoModelForCausalLM.from_pretrained(json.loads((out / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"])
    lora_b = [p for n, p in PeftModel.from_pretrained(base, out).named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # zero at the start: trained
    assert sum(rewards(metrics)[-4:]) > sum(rewards(metrics)[:4])


def test_ternary_samples_from_bitlinear_and_exports_bitnet(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ternary"
    metrics = run_tiny("grpo", out, "train.max_steps=12", "rl.ternary=true", "ternary.lambda_warmup_steps=4",
                       *NO_EVAL)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitnet" and metrics["ternary"] == "qat"
    assert 1.9 < metrics["bits_per_weight"]["quantized_layers_bpw"] < 2.1
    assert sum(rewards(metrics)[-4:]) > sum(rewards(metrics)[:4])
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads it
    again = run_tiny("grpo", tmp_path / "again", "train.max_steps=3", f"model.name_or_path={out}", *NO_EVAL)
    assert again["ternary"] == "start" and (tmp_path / "again" / "config.json").is_file()  # BitLinear kept


USER_REWARDS = '''
import math

def digits(prompts, completions, **kwargs):
    return [float(any(ch.isdigit() for ch in c[0]["content"])) for c in completions]

def no_kwargs(prompts, completions):
    return [0.0] * len(prompts)

def flaky(prompts, completions, trainer_state, **kwargs):
    if trainer_state.global_step >= 2:
        raise ValueError("the checker is down")
    return [0.0] * len(prompts)

def nan_later(prompts, completions, trainer_state, **kwargs):
    return [math.nan if trainer_state.global_step >= 2 else 0.0 for _ in prompts]

def sees_answer(prompts, completions, answer, **kwargs):
    assert "posttrain_origin" not in kwargs and len(answer) == len(completions)
    return [float(c[0]["content"].strip() == a) for c, a in zip(completions, answer)]
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


@pytest.mark.parametrize("function, message", [
    ("missing.py:digits", r"rl\.rewards\[1\]\.function: file missing\.py not found"),
    ("{file}:nope", r"rl\.rewards\[1\]\.function: .*my_rewards\.py defines no 'nope' \(its functions: digits"),
    ("{file}:no_kwargs", r"rl\.rewards\[1\]\.function: no_kwargs\(prompts, completions\) cannot be called .*"
                         r"\*\*kwargs"),
    ("no_such_module:f", r"rl\.rewards\[1\]\.function: no module named 'no_such_module'"),
    ("exact_anser", r"rl\.rewards\[1\]\.function: 'exact_anser' is neither a built-in"),
])
def test_bad_reward_functions_fail_when_the_config_loads(function, message, user_file, tmp_path):
    override = f"rl.rewards=[{{function: exact_answer}}, {{function: '{function.format(file=user_file)}'}}]"
    with pytest.raises(PosttrainError, match=message):
        load_config(CONFIGS / "tiny" / "grpo.yaml", [f"output_dir={tmp_path / 'out'}", override])


def test_a_bad_reward_exits_with_one_line_before_any_model_loads(tmp_path, capsys):
    from posttrain.cli import main

    out = tmp_path / "out"
    code = main(["run", str(CONFIGS / "tiny" / "grpo.yaml"), f"output_dir={out}",
                 "rl.rewards=[{function: exact_answer}, {function: nowhere.py:f}]"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "rl.rewards[1].function" in lines[0] and not out.exists()


def test_math_verify_without_the_package_is_one_clear_line(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify"
                        else find_spec(name, *a))
    with pytest.raises(PosttrainError, match=r"rl\.rewards\[0\]\.function: math_verify needs .*pip install"):
        load_config(CONFIGS / "tiny" / "grpo.yaml", [f"output_dir={tmp_path}/o",
                                                     "rl.rewards=[{function: math_verify}]"])


@pytest.mark.parametrize("function, message", [
    ("flaky", r"rl\.rewards\[1\]\.function \(flaky\) raised ValueError on prompt 0 of the batch "
              r"\(tiny:verifiable\[train\] row \d+\): the checker is down"),
    ("nan_later", r"rl\.rewards\[1\]\.function \(nan_later\) returned nan for prompt 0 of the batch "
                  r"\(tiny:verifiable\[train\] row \d+\)"),
])
def test_a_reward_that_fails_in_training_stops_the_run_unfinished(function, message, user_file, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PosttrainError, match=message):
        run_tiny("grpo", out, "train.max_steps=6", "train.save_steps=1", *NO_EVAL,
                 f"rl.rewards=[{{function: exact_answer}}, {{function: '{user_file}:{function}'}}]")
    assert not is_complete(out) and not (out / "model.safetensors").exists()
    assert (out / "checkpoints" / "checkpoint-2").is_dir()  # the steps before it are kept, resumable


def test_user_rewards_get_the_data_columns_and_their_weights(user_file, tmp_path):
    metrics = run_tiny("grpo", tmp_path / "out", "train.max_steps=4", *NO_EVAL,
                       f"rl.rewards=[{{function: '{user_file}:sees_answer', weight: 2.0}}, "
                       f"{{function: '{user_file}:digits', weight: 0.5}}]")
    last = metrics["reward_functions_last"]
    assert set(last) >= {"rewards/sees_answer/mean", "rewards/digits/mean"}
    saved = (tmp_path / "out" / "posttrain.yaml").read_text()
    assert f"{user_file.resolve()}:digits" in saved  # an absolute path: the saved config runs from anywhere


SLOW_REWARD = '''
import time

def slow_digits(prompts, completions, **kwargs):
    time.sleep(0.15)  # so that the test can kill the run between two checkpoints
    return [float(any(ch.isdigit() for ch in c[0]["content"])) for c in completions]
'''


def cli(args: list[str]) -> subprocess.Popen:
    code = f"import sys\nfrom posttrain.cli import main\nsys.exit(main({args!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(tmp_path):
    reward_file = tmp_path / "slow.py"
    reward_file.write_text(SLOW_REWARD)
    args = ["train.max_steps=12", "train.save_steps=3", *NO_EVAL,
            f"rl.rewards=[{{function: exact_answer}}, {{function: '{reward_file}:slow_digits', weight: 0.2}}]"]
    reference = tmp_path / "reference"
    run_tiny("grpo", reference, *args)
    out = tmp_path / "killed"
    command = ["run", str(CONFIGS / "tiny" / "grpo.yaml"), f"output_dir={out}", *args]
    process = cli(command)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "checkpoint-6").is_dir():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL and not is_complete(out)
    resumed = cli(command + ["--resume"])
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resuming from checkpoint-" in stdout
    trained, expected = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert trained.keys() == expected.keys()
    for name in expected:
        assert torch.equal(trained[name], expected[name]), f"{name} differs after resume"
    history = [json.loads((run / "metrics.json").read_text())["reward_history"] for run in (out, reference)]
    assert history[0] == history[1] and len(history[0]) == 12  # the rewards of every step, restored and continued


@pytest.mark.slow
def test_nproc_2_runs_grpo_on_cpu(tmp_path, tiny_model_dir):
    out = tmp_path / "ddp"
    result = subprocess.run([sys.executable, "-m", "posttrain", "run", str(CONFIGS / "tiny" / "grpo.yaml"),
                             f"output_dir={out}", "train.max_steps=6", "train.batch_size=8", *NO_EVAL, "--nproc", "2"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching: -m accelerate.commands.launch --num_processes 2 --multi_gpu" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6 and len(metrics["reward_history"]) == 6
    assert changed_parameters(out, Path(tiny_model_dir))
    assert not list(out.glob(".final*"))  # only the main process wrote, and finished
