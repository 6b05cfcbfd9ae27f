#!/usr/bin/env bash
# The method comparison on courier with rarely-right cities (experiment=courier_misrouted).
# Extra Hydra overrides are passed through, e.g.: bash sweeps/compare_courier.sh seed=0
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m harness -m +sweep=compare_courier "$@"
