#!/bin/bash
# The GPU numbers of docs/BENCHMARKS.md in one call on one H100/H200 with no network, each part under its own
# time limit so that one slow part cannot cost the others (logs and JSON land in $OUT as each part ends).
#   here, once:           fill .whl/ (git-ignored) with wheels of the packages the GPU image lacks (trl, datasets,
#                         transformers==5.24.0) and a .whl/setup.sh that installs them
#                         and, for the posttrain_liger variant, a liger-kernel wheel in .whl/extra/
#   on the GPU machine:   source .whl/setup.sh && bash scripts/device_benchmarks.sh [kernels] [e2e] [train]
# With no arguments all three parts run; limits (seconds) via LIMIT_KERNELS/LIMIT_E2E/LIMIT_TRAIN. A dry run of this
# script on a CPU: TRAIN_MODE=smoke bash scripts/device_benchmarks.sh train
# Timings on an H200: kernels ~55 s, e2e ~50 s; the train part's 8 standard variants ~300 s, plus a
# throwaway settle run first and a second round of posttrain and trl_defaults last (--rounds, TRAIN_ROUNDS=2),
# ~90 s: a GPU host's speed drifts (two calls of the same code differed by 1.4x), see bench_train.py. The
# exploration variants (TRAIN_EXTRA) run last, so a time limit (LIMIT_TRAIN, default 390 s) cuts them first: give
# them a call of their own (TRAIN_VARIANTS="posttrain trl_defaults" TRAIN_ROUNDS=1 and the extras) when they matter.
# The default limits (kernels 100, e2e 70, train 390 s) keep a call of all three parts under the device's 600 s per
# command. One 15-minute session: two calls of ~400 s (a machine's start costs ~30 s; each further start needs
# 240 s of budget left), e.g. `train` with the exploration variants first, then what its results call for.
# Helpers (subagents) must not call the device tools: they share the session's budget.
set -u
OUT=${OUT:-/tmp/posttrain-bench}
mkdir -p "$OUT"
parts=${*:-kernels e2e train}  # rl: on request

run_part() {  # name limit command...: the command's output goes to $OUT/name.log, its tail to stdout
    local name=$1 limit=$2
    shift 2
    echo "=== $name: start $(date +%T), limit ${limit}s: $*"
    timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc $rc at $(date +%T)$([ $rc = 124 ] && echo ' (time limit)')"
    grep -v -e "Warning" -e "warnings.warn" "$OUT/$name.log" | tail -n "${TAIL_LINES:-45}"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || echo "no nvidia-smi"
for part in $parts; do
    case $part in
        kernels) run_part ternary_kernels "${LIMIT_KERNELS:-100}" python3 scripts/bench_ternary.py --skip-e2e \
                     --json "$OUT/ternary_kernels.json" ;;
        e2e) run_part ternary_e2e "${LIMIT_E2E:-70}" python3 scripts/bench_ternary.py --skip-kernels \
                 --json "$OUT/ternary_e2e.json" ;;
        train)
            # TRAIN_VARIANTS / TRAIN_EXTRA (space-separated) narrow a short call to what it has to measure (TRAIN_EXTRA=
            # for none); TRAIN_ROUND_EXTRA: extras measured in every round too (e.g. posttrain_compile); TRAIN_TASK:
            # sft, dpo or all (default)
            extra=${TRAIN_EXTRA-plain_loop posttrain_compile posttrain_cudagraphs posttrain_profile posttrain_liger \
                posttrain_8k}
            if ls .whl/extra/liger_kernel-*.whl >/dev/null 2>&1; then  # for the posttrain_liger variant only
                python3 -m pip install -q --no-index --no-deps --target /tmp/liger_site .whl/extra/liger_kernel-*.whl \
                    && export BENCH_LIGER_PATH=/tmp/liger_site
            else
                extra=${extra//posttrain_liger/}
            fi
            run_part train "${LIMIT_TRAIN:-390}" python3 scripts/bench_train.py --mode "${TRAIN_MODE:-gpu}" \
                --task "${TRAIN_TASK:-all}" --extra $extra --rounds "${TRAIN_ROUNDS:-2}" \
                ${TRAIN_VARIANTS:+--variants $TRAIN_VARIANTS} \
                ${TRAIN_ROUND_EXTRA:+--round-extra $TRAIN_ROUND_EXTRA} \
                --out "$OUT/train" ;;
        rl)
            # The RL and 1.58-bit recipes on the GPU (the tiny configs, bf16): SFT, ternary QAT, ternary QAT distilled,
            # LoRA on the ternary model and its exact merge, GRPO full and on the ternary model. Then bench_grpo: on
            # the demo's SFT model (carried as .whl/demo-sft: `posttrain demo`, then cp -r runs/demo/sft .whl/demo-sft)
            # and on a random model of Qwen2.5-0.5B's shape (tiny vocabulary), whose completions run to the limit.
            run_part rl_recipes "${LIMIT_RL_RECIPES:-150}" bash scripts/device_rl_recipes.sh /tmp/posttrain-rl
            if [ -d .whl/demo-sft ]; then
                run_part grpo_demo "${LIMIT_GRPO_DEMO:-90}" python3 scripts/bench_grpo.py --model .whl/demo-sft \
                    --steps "${GRPO_STEPS:-60}" --rounds 2
            fi
            run_part grpo_mid "${LIMIT_GRPO_MID:-160}" python3 scripts/bench_grpo.py --rounds 1 \
                --random-qwen2.5-0.5b-shape --steps "${GRPO_MID_STEPS:-10}" \
                --set rl.max_completion_length="${GRPO_MID_LENGTH:-128}" --set train.max_length=256 ;;
        *) echo "unknown part $part (kernels, e2e, train, rl)"; exit 2 ;;
    esac
done
