#!/usr/bin/env bash
# The method comparison on the courier task (Alpaca-style instructions, graded gold reward).
# Extra Hydra overrides are passed through, e.g.: bash sweeps/compare_courier.sh seed=0
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m harness -m +sweep=compare_courier "$@"
