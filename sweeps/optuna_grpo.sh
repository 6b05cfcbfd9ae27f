#!/usr/bin/env bash
# A hyperparameter search with the Optuna sweeper plugin for Hydra (TPE): GRPO's learning rate,
# Extra Hydra overrides are passed through, e.g.: bash sweeps/optuna_grpo.sh seed=0
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m harness -m +sweep=optuna_grpo "$@"
