#!/usr/bin/env bash
# Tune each method's KL coefficient (method.beta) and learning rate on the validation split of
# prompts (every conf/sweep/tune_<method>.yaml: 3 x 2 settings x 2 seeds), then print the best
# setting of each. Extra Hydra overrides are passed through, e.g.: bash sweeps/tune.sh model=llama_small
set -euo pipefail
cd "$(dirname "$0")/.."
for sweep in conf/sweep/tune_*.yaml; do
  python -m harness -m "+sweep=$(basename "$sweep" .yaml)" "$@"
done
python -m harness.tuning
