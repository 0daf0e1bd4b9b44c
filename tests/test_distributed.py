"""Recipes under 2-process DDP on CPU (gloo), launched by the tests themselves.

The invariant: 2 processes x batch B give the loss trajectory and the weights of 1 process x batch B with 2
gradient-accumulation steps (fp32; the same examples enter each optimizer step, and the loss is normalized
over all of the step's tokens in both). Also: `posttrain run --nproc 2` (accelerate launch) runs the ternary
and LoRA recipes, and only the main process writes the output folder.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
STEPS = 4


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args, timeout=600):
    torchrun_bin = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    return subprocess.run([torchrun_bin, "--standalone", "--nproc_per_node", "2", "-m", "posttrain", "run", *args],
                          capture_output=True, text=True, timeout=timeout, env=env())


def single(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "posttrain", "run", *args], capture_output=True, text=True,
                          timeout=timeout, env=env())


def common(recipe: str, out: Path, start: Path) -> list[str]:
    return [str(CONFIGS / "tiny" / f"{recipe}.yaml"), f"output_dir={out}", f"train.max_steps={STEPS}",
            "train.logging_steps=1", "train.batch_size=4", "train.warmup_ratio=0", "data.eval=[]",
            f"model.name_or_path={start}"]


@pytest.mark.parametrize("recipe", ["sft", "dpo"])
def test_two_process_ddp_equals_one_process_with_two_accumulation_steps(recipe, tmp_path, tiny_sft_dir):
    start = tiny_sft_dir if recipe == "dpo" else "tiny:llama"
    ddp = torchrun(*common(recipe, tmp_path / "ddp", start), "train.grad_accum=1")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("read once, on the main process, for all 2 processes") == 1  # tokenized once
    one = single(*common(recipe, tmp_path / "one", start), "train.grad_accum=2")
    assert one.returncode == 0, one.stderr[-3000:]
    runs = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("ddp", "one")]
    losses = [[loss for _, loss in run["train_loss_history"]] for run in runs]
    assert len(losses[0]) == len(losses[1]) == STEPS
    assert losses[0] == pytest.approx(losses[1], abs=1e-5), losses
    assert losses[0][0] != losses[0][-1]  # it trained
    weights = [load_file(tmp_path / name / "model.safetensors") for name in ("ddp", "one")]
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], atol=1e-5, rtol=0)
    assert not list((tmp_path / "ddp").glob(".final*"))


@pytest.mark.parametrize("recipe,extra", [("ternary", []), ("lora", ["model.name_or_path=tiny:llama"])])
def test_nproc_launches_the_recipe_under_accelerate(recipe, extra, tmp_path, tiny_sft_dir):
    out = tmp_path / recipe
    args = [str(CONFIGS / "tiny" / f"{recipe}.yaml"), f"output_dir={out}", f"train.max_steps={STEPS}",
            "train.logging_steps=1", "train.batch_size=4", f"model.name_or_path={tiny_sft_dir}", *extra]
    result = subprocess.run([sys.executable, "-m", "posttrain", "run", *args, "--nproc", "2"], capture_output=True,
                            text=True, timeout=600, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching: -m accelerate.commands.launch --num_processes 2 --multi_gpu" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and len(metrics["train_loss_history"]) == STEPS
    assert metrics["world_size"] == 2
