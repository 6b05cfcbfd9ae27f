#!/usr/bin/env bash
# Tune every method on each track with the same budget: every conf/sweep/tune_<method>.yaml grid
# (3 KL coefficients x 3 learning rates x 2 seeds, validation split, group `tune`) on the oracle
# track (PPO, GRPO, RLOO, online DPO: the gold reward) and the preferences track (the same on the
# reward model, and offline DPO on the pairs), jobs side by side (+launch=parallel, one thread
# each); then print each method's best setting per track. Resumable: run it again after a cut and
# finished jobs are skipped. Extra Hydra overrides pass through, e.g.
#   bash sweeps/tune.sh model=llama_small
#   TRACKS=oracle bash sweeps/tune.sh model=moe_small
# DRY_RUN=1 prints the multirun commands instead of running them (then no tuning report).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
launch() {
  if [ -n "${DRY_RUN:-}" ]; then echo "$py -m harness $*"; else "$py" -m harness "$@"; fi
}
for track in ${TRACKS:-oracle preferences}; do
  for sweep in conf/sweep/tune_*.yaml; do
    method=$(basename "$sweep" .yaml)
    method=${method#tune_}
    case $method in *_preferences) continue ;; esac  # a track's own grid, picked below
    if [ "$track" = oracle ] && [ "$method" = dpo ]; then
      continue  # offline DPO learns from the pairs: the preferences track only
    fi
    grid="tune_$method"
    if [ -f "conf/sweep/tune_${method}_$track.yaml" ]; then
      grid="tune_${method}_$track"  # the method's grid on this track (larger KL on the reward model)
    fi
    launch -m +launch=parallel "+sweep=$grid" track="$track" "$@"
  done
done
[ -n "${DRY_RUN:-}" ] && exit 0
# the records are where the jobs wrote them (results_dir: $HARNESS_RESULTS_DIR, else results/)
"$py" -m harness.tuning --runs "${HARNESS_RESULTS_DIR:-results}/runs"
