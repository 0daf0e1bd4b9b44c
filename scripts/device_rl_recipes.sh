#!/bin/bash
# The tiny RL and 1.58-bit recipes end to end on whatever device torch picks (bf16 on a GPU): SFT, ternary QAT,
# ternary QAT distilled from the SFT model, LoRA on the ternary model and its exact ternary merge, GRPO of the full
# model and of the ternary model (sampled from BitLinear). Each run prints its one-line summary; the first failure
# stops the script with its log. Run by scripts/device_benchmarks.sh rl; on a CPU: bash scripts/device_rl_recipes.sh
set -eu
o=${1:-/tmp/posttrain-rl}
steps=${RL_STEPS:-30}
rm -rf "$o" && mkdir -p "$o"
run() {  # name config overrides...
    local name=$1 config=$2
    shift 2
    echo "--- $name: $config $*"
    if ! python3 -m posttrain run "configs/tiny/$config.yaml" "output_dir=$o/$name" "train.max_steps=$steps" "$@" \
        >"$o/$name.log" 2>&1; then
        tail -n 30 "$o/$name.log"
        exit 1
    fi
    grep -a "posttrain: done\|device" "$o/$name.log" | tail -n 3
}
run sft sft
run ternary ternary "model.name_or_path=$o/sft"
run ternary-kd ternary-kd "model.name_or_path=$o/sft"
run ternary-lora ternary-lora "model.name_or_path=$o/ternary"
python3 -m posttrain merge "$o/ternary-lora" --out "$o/ternary-lora-merged" >"$o/merge.log" 2>&1 || { tail "$o/merge.log"; exit 1; }
echo "--- merge: $(ls "$o/ternary-lora-merged" | tr '\n' ' ')"
run grpo grpo "model.name_or_path=$o/sft"
run grpo-ternary grpo "model.name_or_path=$o/sft" rl.ternary=true
python3 - "$o" <<'PY'
import json, sys
from pathlib import Path
for name in ("sft", "ternary", "ternary-kd", "ternary-lora", "grpo", "grpo-ternary"):
    m = json.loads((Path(sys.argv[1]) / name / "metrics.json").read_text())
    keys = ("device", "steps", "train_loss_first", "train_loss_last", "reward_first", "reward_last", "train_runtime_s")
    print(name, {k: m.get(k) for k in keys if m.get(k) is not None})
PY
