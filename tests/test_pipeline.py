"""Pipelines: stage references checked up front; a killed run resumes without redoing finished stages;
the demo's report shows the differences it exists to show."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.errors import PosttrainError
from posttrain.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
TINY_SFT = ROOT / "configs" / "tiny" / "sft.yaml"


def write_pipeline(tmp_path, stages: str) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(f"recipe: pipeline\noutput_dir: {tmp_path / 'out'}\nstages:\n{stages}")
    return path


def test_stage_references_and_kinds_are_checked(tmp_path):
    with pytest.raises(PosttrainError, match=r"pipe\.yaml:\d+: stages\[1\] refers to 'nope'"):
        stages = f"  - {{name: a, config: {TINY_SFT}}}\n  - {{name: b, quantize: nope}}\n"
        load_pipeline(write_pipeline(tmp_path, stages))
    with pytest.raises(PosttrainError, match="exactly one of config, quantize or compare"):
        load_pipeline(write_pipeline(tmp_path, f"  - {{name: a, config: {TINY_SFT}, quantize: a}}\n"))
    with pytest.raises(PosttrainError, match="unknown key 'stages\\[0\\].confg'"):
        load_pipeline(write_pipeline(tmp_path, f"  - {{name: a, confg: {TINY_SFT}}}\n"))
    with pytest.raises(PosttrainError, match=r"stages\[1\]\.baseline 'c' is not one of the compared stages"):
        stages = f"  - {{name: a, config: {TINY_SFT}}}\n  - {{name: r, compare: [a], suite: s.yaml, baseline: c}}\n"
        load_pipeline(write_pipeline(tmp_path, stages))


def test_killed_pipeline_resumes_without_redoing_finished_stages(tmp_path):
    stage_b = f"{{name: b, config: {TINY_SFT}, model_from: a, overrides: [train.max_steps=400]}}"
    path = write_pipeline(tmp_path, f"  - {{name: a, config: {TINY_SFT}, overrides: [train.max_steps=5]}}\n"
                                    f"  - {stage_b}\n")
    command = [sys.executable, "-u", "-m", "posttrain", "run", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in process.stdout:  # wait until stage b is training, then kill -9 in the middle of it
        if "stage b: running" in line:
            time.sleep(8)
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    out = tmp_path / "out"
    assert (out / "a" / "metrics.json").is_file() and not (out / "b" / "metrics.json").exists()
    finished_a = (out / "a" / "metrics.json").stat().st_mtime_ns
    path.write_text(path.read_text().replace("train.max_steps=400", "train.max_steps=3"))  # finish b quickly
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stage a: finished earlier, skipped" in rerun.stdout
    assert (out / "a" / "metrics.json").stat().st_mtime_ns == finished_a
    assert json.loads((out / "b" / "metrics.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_demo_report_shows_meaningful_differences(tmp_path):
    """A fresh demo's reports. POSTTRAIN_DEMO_DIR names a demo this same checkout finished in this CI run (.ci/run
    runs it from the wheel install, empty folder, and points here so that the 5-minute demo runs once); without
    it the test runs its own."""
    from posttrain.cli import main

    made = os.environ.get("POSTTRAIN_DEMO_DIR")
    if made:
        assert all((Path(made) / report / "compare.json").is_file() for report in ("report", "report-ternary")), (
            f"POSTTRAIN_DEMO_DIR={made} is not a finished demo (no report/compare.json)")
        demo = Path(made)
    else:
        demo = tmp_path / "demo"
        assert main(["demo", "--out", str(demo)]) == 0
    results = json.loads((demo / "report" / "results.json").read_text())["variants"]
    exact = {name: metrics["gen/add/exact_match"] for name, metrics in results.items()}
    preference = {name: metrics["preference/accuracy"] for name, metrics in results.items()}
    print("exact match", exact, "preference accuracy", preference)
    stats = json.loads((demo / "report" / "results.json").read_text())["stats"]["comparisons"]
    below_sft = {name: by_key["gen/add/exact_match"]["significant"] and by_key["gen/add/exact_match"]["diff"] < 0
                 for name, by_key in stats.items()}
    # The task has headroom: SFT learns it well but not perfectly, on >= 500 held-out items.
    assert stats["lora"]["gen/add/exact_match"]["n"] >= 500
    assert 0.4 <= exact["sft"] <= 0.85 and exact["base"] == 0.0
    assert exact["lora"] >= 0.5 * exact["sft"]  # LoRA learns the task too
    assert preference["dpo"] > preference["sft"]  # DPO's held-out preference accuracy beats SFT's
    assert exact["ternary"] < exact["sft"] and below_sft["ternary"]  # 1.58-bit QAT pays, visibly (paired test)
    assert exact["ptq"] <= 0.1 * exact["sft"] and below_sft["ptq"]  # ternarizing without training collapses
    grpo = stats["grpo"]["gen/add/exact_match"]  # RL on the verifiable reward lifts held-out greedy answers
    assert grpo["diff"] > 0 and grpo["p_holm"] < 0.05 and grpo["significant"]
    grpo_history = json.loads((demo / "grpo" / "metrics.json").read_text())
    assert [h["step"] for h in grpo_history["eval_history"]] == [50, 100, 150] and grpo_history["reward_history"]
    ternary_report = json.loads((demo / "report-ternary" / "results.json").read_text())
    against_qat = ternary_report["stats"]["comparisons"]
    assert ternary_report["stats"]["baseline"] == "ternary" and set(against_qat) == {"ternary-kd", "ternary-grpo"}
    assert all(0 <= by_key["gen/add/exact_match"]["p"] <= 1 for by_key in against_qat.values())
    assert sorted(p.name for p in (demo / "report").glob("*.png"))
    report = (demo / "report" / "report.md").read_text()
    stages = ("base", "sft", "lora", "dpo", "grpo", "ternary", "ternary-kd", "ternary-lora", "ptq")
    assert all(name in report for name in stages)
    folder = demo / "report"
    assert json.loads((folder / "compare.json").read_text())["baseline"] == "sft"
    assert (folder / "report.html").is_file() and (folder / "samples" / "ptq" / "gen-add.jsonl").is_file()
    history = json.loads((demo / "sft" / "metrics.json").read_text())["eval_history"]
    assert [h["step"] for h in history] == [100, 200, 300]  # scored while training (evaluate: in sft.yaml)
    _assert_readme_table_matches((folder / "summary.md").read_text(), "demo-summary")
    _assert_readme_table_matches((demo / "report-ternary" / "summary.md").read_text(),
                                 "demo-ternary-summary")


def _numbers(table: str) -> list[list]:
    """Each cell of a markdown table as its numbers (value and interval) or, without numbers, its text."""
    rows = []
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append([[float(x) for x in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", c.replace(",", ""))] or c
                     for c in cells])
    return rows


def _assert_readme_table_matches(printed: str, marker: str) -> None:
    """The README's demo table is the one a fresh demo prints: same rows and marks, numbers within 0.05 (thread
    counts can move a float and so a greedy answer or two)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split(f"<!-- {marker}: start -->")[1].split(f"<!-- {marker}: end -->")[0]
    mine, theirs = _numbers(block), _numbers(printed)
    assert len(mine) == len(theirs), f"README demo table has {len(mine)} rows, the demo printed {len(theirs)}"
    for row_readme, row_demo in zip(mine, theirs):
        for a, b in zip(row_readme, row_demo):
            if isinstance(a, list) and isinstance(b, list):
                assert len(a) == len(b) and all(abs(x - y) <= 0.05 * max(1.0, abs(y)) for x, y in zip(a, b)), (
                    f"README's demo table is stale: {row_readme} vs the demo's {row_demo}; paste summary.md")
            else:
                assert a == b, f"README's demo table is stale: {row_readme} vs the demo's {row_demo}"
