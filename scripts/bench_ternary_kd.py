"""What the teacher costs: ternary QAT steps/s with and without distillation, in one run of this script.

    python scripts/bench_ternary_kd.py                                   # the tiny model, 30 steps each
    python scripts/bench_ternary_kd.py --config configs/qwen2.5-0.5b/ternary-kd.yaml --steps 40 --rounds 3 \\
        --set model.name_or_path=runs/qwen2.5-0.5b-sft --set distill.teacher=runs/qwen2.5-0.5b-sft

Each round runs the recipe twice on the same config, data and starting model: once as plain ternary QAT (the
`distill:` section removed) and once distilling, alternating so that machine drift falls on both alike. A rate is
the Trainer's steps over its training-loop time (train_runtime: forward, backward, optimizer, data loading; set-up
and saving excluded). Printed: one JSON line per run, then the medians and `kd_time_ratio` (seconds per step with
the teacher / without), which is the teacher's forward pass plus the full logits the KD needs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def one_run(config: str, overrides: list[str], distill: bool, out: Path) -> dict:
    import torch

    import posttrain
    from posttrain.config.schema import load_config

    cfg = load_config(config, [*overrides, f"output_dir={out}", "overwrite=true",
                               *([] if distill else ["distill=null"])])
    metrics = posttrain.run(cfg)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    steps, seconds = metrics["steps"], metrics["train_runtime_s"]
    return {"variant": "distill" if distill else "plain", "steps": steps, "train_runtime_s": round(seconds, 3),
            "steps_per_s": round(steps / seconds, 4), "tokens_per_s": round(metrics["tokens_per_second"], 1),
            "device": metrics["device"]}


def summary(rows: list[dict]) -> dict:
    rate = {v: statistics.median(r["steps_per_s"] for r in rows if r["variant"] == v) for v in ("plain", "distill")}
    return {"plain_steps_per_s": rate["plain"], "distill_steps_per_s": rate["distill"],
            "kd_time_ratio": round(rate["plain"] / rate["distill"], 3), "rounds": len(rows) // 2}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny" / "ternary-kd.yaml"))
    p.add_argument("--model", default="tiny:llama", help="the starting model (and, by default, the teacher)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--out", default=None, help="folder for the runs' outputs (default: a temporary one)")
    args = p.parse_args(argv)
    overrides = [f"model.name_or_path={args.model}", f"train.max_steps={args.steps}", "train.eval_steps=0",
                 "data.eval=[]", "data.eval_fraction=0", *args.set]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-kd-") as scratch:
        out = Path(args.out or scratch)
        for round_ in range(args.rounds):
            order = (False, True) if round_ % 2 == 0 else (True, False)
            for distill in order:
                rows.append(one_run(args.config, overrides, distill, out / ("kd" if distill else "plain")))
                print(json.dumps(rows[-1]), flush=True)
    result = summary(rows)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
