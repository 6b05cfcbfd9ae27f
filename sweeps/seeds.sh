#!/usr/bin/env bash
# The comparison at many seeds: both tracks (oracle and preferences) for llama_small at seeds 0-9
# and moe_small at seeds 0-4, group `tracks`, jobs side by side (+launch=parallel, one thread each).
#
# One command, resumable: run it again after a cut and every job with an ok record of the same
# config on this platform is skipped (skip_done), so it goes on where it stopped.
#   bash sweeps/seeds.sh                                  # everything (extra overrides pass through)
#   SEEDS="llama_small:range(0,10)" bash sweeps/seeds.sh  # one model; Hydra's sweep syntax per model
#
# Per model it runs three multiruns: first the SFT base and reward model of every seed (method=rm,
# one seed a job, so no job idles on another's stage lock), then the oracle track, then the
# preferences track (both read those stages from the cache). The leaderboard is rebuilt after each.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${SEEDS:-"llama_small:range(0,10) moe_small:range(0,5)"}
for entry in $seeds; do
  model=${entry%%:*}
  seed=${entry#*:}
  python -m harness -m +launch=parallel method=rm group=tracks model="$model" seed="$seed" "$@"
  python -m harness -m +launch=parallel +sweep=tracks model="$model" seed="$seed" "$@"
  python -m harness -m +launch=parallel +sweep=tracks_preferences model="$model" seed="$seed" "$@"
done
