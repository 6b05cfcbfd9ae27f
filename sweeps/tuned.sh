#!/usr/bin/env bash
# The comparison at each method's tuned setting: both tracks, every method at the (beta, lr) that
# won its tuning on that track and model (bash sweeps/tune.sh, then python -m harness.tuning over
# group `tune`), on arith's test split, group `tracks_tuned`, jobs side by side (+launch=parallel,
# one thread each). Every method and track must have been tuned for every model asked: a missing
# one stops the script before any job, naming it.
#
#   bash sweeps/tuned.sh                                   # llama_small seeds 0-9, moe_small 0-4
#   SEEDS="llama_small:range(0,3)" bash sweeps/tuned.sh    # one model; Hydra's sweep syntax
#
# Resumable (skip_done): run it again after a cut and it goes on where it stopped. Per model: the
# SFT bases and reward models of every seed first (method=rm, a seed a job), then one multirun per
# (track, method). Extra overrides pass through; DRY_RUN=1 prints the commands instead.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${SEEDS:-"llama_small:range(0,10) moe_small:range(0,5)"}
py=${PYTHON:-python}
runs="${HARNESS_RESULTS_DIR:-results}/runs"
declare -A methods=([oracle]="ppo grpo rloo online_dpo" [preferences]="ppo grpo rloo online_dpo dpo")

tuned=$("$py" -m harness.tuning --runs "$runs" --group tune 2>/dev/null) || true
best() {  # the tuned overrides of method $1 on model $2 and track $3, from harness.tuning's lines
  echo "$tuned" | awk -v m="$1" -v model="$2" -v t="$3" \
    '$1 == m && $2 == model && $3 == "arith" && $4 == t { sub(/.*: /, ""); print }'
}

missing=()
for entry in $seeds; do
  for track in oracle preferences; do
    for m in ${methods[$track]}; do
      [ -n "$(best "$m" "${entry%%:*}" "$track")" ] || missing+=("$m/${entry%%:*}/$track")
    done
  done
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "tuned.sh: not tuned in $runs (group tune): ${missing[*]} (method/model/track); run" \
       "bash sweeps/tune.sh model=<model> first" >&2
  exit 1
fi

launch() {
  if [ -n "${DRY_RUN:-}" ]; then echo "$py -m harness $*"; else "$py" -m harness "$@"; fi
}

for entry in $seeds; do
  model=${entry%%:*}
  seed=${entry#*:}
  launch -m +launch=parallel method=rm group=tracks_tuned model="$model" seed="$seed" "$@"
  for track in oracle preferences; do
    for m in ${methods[$track]}; do
      # shellcheck disable=SC2046  # the tuned setting is several overrides
      launch -m +launch=parallel $(best "$m" "$model" "$track") group=tracks_tuned \
        model="$model" seed="$seed" "$@"
    done
  done
done
