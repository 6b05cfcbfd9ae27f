#!/usr/bin/env bash
# Tune each method's KL coefficient (DPO/GRPO beta, PPO kl_coef) and learning rate on the
# validation split of prompts (5 x 3 settings x 2 seeds per method), then print the best setting
# of each. Extra Hydra overrides are passed through, e.g.: bash sweeps/tune.sh model=llama_small
set -euo pipefail
cd "$(dirname "$0")/.."
for method in dpo grpo ppo; do
  python -m harness -m "+sweep=tune_${method}" "$@"
done
python -m harness.tuning
