#!/usr/bin/env bash
# GRPO's KL coefficient beta traces its reward-KL frontier (arith / llama_small).
# Extra Hydra overrides are passed through, e.g.: bash sweeps/beta_grpo.sh seed=0
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m harness -m +sweep=beta_grpo "$@"
