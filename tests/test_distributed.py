"""Recipes under torchrun (2 CPU processes, gloo): one output folder written once, by the main process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def torchrun(*args, timeout=600):
    torchrun_bin = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([torchrun_bin, "--standalone", "--nproc_per_node", "2", "-m", "posttrain", "run", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("recipe", ["sft", "dpo"])
def test_recipe_runs_under_two_process_ddp(recipe, tmp_path):
    out = tmp_path / recipe
    extra = ["model.name_or_path=tiny:llama"] if recipe == "dpo" else []
    result = torchrun(str(CONFIGS / "tiny" / f"{recipe}.yaml"), f"output_dir={out}", "train.max_steps=4",
                      "train.logging_steps=1", "train.batch_size=8", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and len(metrics["train_loss_history"]) == 4
    assert (out / "model.safetensors").is_file() and not list(out.glob(".final.*"))
