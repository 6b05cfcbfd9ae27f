#!/usr/bin/env bash
# The method comparison: PPO, GRPO and DPO x llama_small, moe_small x 3 seeds on arith.
# Extra Hydra overrides are passed through, e.g.: bash sweeps/compare.sh seed=0
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m harness -m +sweep=compare "$@"
