"""``python -m harness.bench``: throughput, step time and memory figures of the harness.

Three sections, each printed as a table per model preset (``--json PATH`` also dumps them):

1. **sampler**: our KV-cached :func:`harness.models.generation.generate` against ``transformers``'
   ``generate`` on the exported model (:func:`harness.models.hf.to_hf_model`): same seeded random
   weights, same prompts, greedy, both forced to produce exactly ``--new-tokens`` tokens.
2. **steps**: seconds per optimisation step of every method (sft, rm, dpo, ppo, grpo): the real
   LightningModules, built from the method configs in ``conf/method`` (only batch sizes and
   iteration counts overridden), trained by a real ``lightning.Trainer`` on the built-in ``arith``
   task from a random-init policy; a callback times ``on_train_batch_start`` -> ``on_train_batch_end``.
   ``--profile`` splits each batch into phases (:mod:`harness.util.step_profile`).
3. **memory**: peak memory of PPO against GRPO at the same number of sequences per rollout: the
   model state computed from the tensors (parameters of every network held, gradients, AdamW
   states) and the measured peak (CUDA allocator, or peak RSS of a fresh subprocess on CPU).
4. **--vs trl** (:mod:`harness.bench.vs_trl`): GRPO and DPO steps beside TRL's ``GRPOTrainer`` /
   ``DPOTrainer`` at the same settings, interleaved over ``--rounds`` rounds in this process, with
   the machine's fp32 matmul peak and each step's achieved FLOP/s. It needs the ``trl`` extra and
   runs after the sampler table at the same shape (``--sections`` names others instead); its
   defaults are the comparison's settings
   (``llama_trl_bench``, 64 = 8 prompts x 8 sequences of 16 new tokens, 8 DPO pairs, 2 threads).

5. **--curves DIR** (:mod:`harness.bench.curves`): seconds per step and tokens/s of SFT, DPO, GRPO
   and PPO against model size (llama_tiny, llama_small, llama_25m, smollm2_135m), batch and
   response length, with fitted power-law growth, written to ``DIR/cost_curves.{md,json,png}``
   (runs alone unless ``--sections`` names others; ``--quick``: a smoke-sized sweep).

Examples::

    python -m harness.bench                                  # llama_small and moe_small, batch 64
    python -m harness.bench --quick --models llama_tiny      # seconds, for a smoke test
    python -m harness.bench --sections sampler --new-tokens 64 --json bench.json
    python -m harness.bench --sections steps --methods grpo dpo --profile   # time by phase
    python -m harness.bench --vs trl                         # needs pip install -e '.[trl]'
    python -m harness.bench --curves results/cost_curves     # 4-9 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from harness.bench.common import (
    DEFAULT_MODELS,
    MEMORY_MARK,
    OFFLINE_ENV,
    SECTIONS,
    format_table,
    methods,
    model_config,
    quiet,
    resolve_device,
)
from harness.bench.sampler import PRECISIONS, bench_sampler, load_note, sampler_columns, sampler_notes
from harness.util.conf_path import config_dir

QUICK = {"batch": 16, "prompt_len": 8, "new_tokens": 16, "iters": 2, "warmup": 1, "mem_iters": 1}
DEFAULTS = {"batch": 64, "prompt_len": 8, "new_tokens": 32, "iters": 5, "warmup": 1, "mem_iters": 2}
VS_TRL = {"models": ["llama_trl_bench"], "batch": 64, "new_tokens": 16, "pairs": 8,
          "ppo_prompts": 8, "rounds": 3, "iters": 5, "warmup": 1, "threads": 2}
"""``--vs trl``'s settings (issue 14): the TRL-benchmark shape, GRPO 8 prompts x 8 completions x
16 new tokens in one minibatch, DPO 8 pairs, PPO 8 prompts x 16 tokens (4 epochs), 2 threads, 3
interleaved rounds."""
VS_TRL_QUICK = {**VS_TRL, "models": ["llama_tiny"], "batch": 8, "new_tokens": 4, "pairs": 2,
                "ppo_prompts": 2, "rounds": 1, "iters": 1}
LEAST = {"--batch": 1, "--prompt-len": 1, "--new-tokens": 1, "--rollout-tokens": 1, "--iters": 1,
         "--warmup": 0, "--mem-iters": 1, "--vocab": 5, "--ppo-prompts": 1, "--rounds": 1,
         "--pairs": 1, "--minibatch": 1, "--lora": 0, "--threads": 1, "--seed": 0}
"""The least value of each numeric option, checked before any work (the sampler's random prompts
draw ids above the 4 special ones, hence a vocabulary of at least 5)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset sizes take ``--quick``'s values or the defaults."""
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+",
                   help="model presets from conf/model (default: llama_small moe_small; "
                        "--vs trl: llama_trl_bench)")
    p.add_argument("--batch", type=int, help="sequences per batch / rollout (default 64; quick 16)")
    p.add_argument("--prompt-len", type=int, help="sampler prompt length (default 8)")
    p.add_argument("--new-tokens", type=int, help="sampler new tokens (default 32; quick 16)")
    p.add_argument("--rollout-tokens", type=int,
                   help="steps section: new tokens per response of the on-policy methods "
                        "(method.rollout.max_new_tokens; default: each method config's)")
    p.add_argument("--iters", type=int, help="timed repeats / batches (default 5; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed warm-up calls / batches (default 1)")
    p.add_argument("--mem-iters", type=int, help="batches run for the memory peak (default 2; quick 1)")
    p.add_argument("--vocab", type=int, default=512, help="sampler vocabulary size (default 512)")
    p.add_argument("--methods", nargs="+", default=list(methods()), choices=methods(),
                   help="methods timed in the steps section (default: every registered stage)")
    p.add_argument("--sections", nargs="*", choices=SECTIONS,
                   help="default: all three; sampler only with --vs, none with --curves; "
                        "--sections alone: none")
    p.add_argument("--vs", choices=("trl",),
                   help="time GRPO and DPO steps beside TRL's trainers (needs the trl extra)")
    p.add_argument("--curves", type=Path, metavar="DIR",
                   help="cost curves against model size, batch and response length, written to "
                        "DIR/cost_curves.{md,json,png}")
    p.add_argument("--vs-steps", nargs="+", default=["grpo", "dpo"], choices=("grpo", "dpo", "ppo"),
                   help="--vs: the steps compared (default grpo dpo; ppo needs TRL 1.12 in an "
                        "environment of its own, see harness/bench/README.md)")
    p.add_argument("--ppo-prompts", type=int, help="--vs: PPO prompts per step (default 8; quick 2)")
    p.add_argument("--rounds", type=int, help="--vs: interleaved rounds (default 3; quick 1)")
    p.add_argument("--pairs", type=int, help="--vs: DPO pairs per step (default 8; quick 2)")
    p.add_argument("--minibatch", type=int, help="override PPO/GRPO minibatch_size (default: conf)")
    p.add_argument("--fused-adamw", action="store_true",
                   help="steps and --vs: every optimiser with optim.fused=true (TRL's side: "
                        "adamw_torch_fused); default: the configs' per-tensor AdamW")
    p.add_argument("--share-prompt", action="store_true",
                   help="steps and --vs: DPO scores each pair, GRPO and RLOO each group, with "
                        "its prompt once (method.share_prompt=true); default: a row per sequence")
    p.add_argument("--memory-methods", nargs="+", default=["ppo", "grpo"], choices=methods(),
                   help="methods measured in the memory section (default: ppo grpo)")
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="LoRA adapters of rank R on the trained policy (model.lora.r; default 0: "
                        "full fine-tuning)")
    p.add_argument("--precision", default="32-true", choices=PRECISIONS,
                   help="sampler and steps sections (Lightning's names): 32-true (default); "
                        "bf16-true: bf16 weights; bf16-mixed: float32 weights under bf16 "
                        "autocast, as trainer=gpu trains")
    p.add_argument("--profile", action="store_true",
                   help="steps section: also split each method's batch into phases (sampling, "
                        "reward, reference, value, forward, backward, optimizer, other) with "
                        "Lightning's SimpleProfiler (harness.util.step_profile)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", type=Path, help="task/tokenizer cache (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--_memory-child", dest="memory_child", choices=methods(),
                   help=argparse.SUPPRESS)
    p.add_argument("--_n-examples", dest="n_examples", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.precision != "32-true" and (args.vs or args.curves):
        p.error(f"--precision {args.precision}: the sampler and steps sections only (--vs and "
                "--curves run in float32)")
    for option, least in LEAST.items():
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is not None and value < least:
            p.error(f"{option}={value}: must be >= {least}")
    known = sorted(f.stem for f in (config_dir() / "model").glob("*.yaml") if f.stem != "hf")
    for m in args.models or ():
        if m not in known:
            p.error(f"--models {m}: no such preset in conf/model; known: {', '.join(known)}")
    if args.profile and (args.vs or args.curves
                         or (args.sections is not None and "steps" not in args.sections)):
        p.error("--profile: the steps section only (--vs and --curves time their steps without "
                "a profiler)")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command, for reports
    unset = {**(QUICK if args.quick else DEFAULTS), "models": list(DEFAULT_MODELS),
             "sections": ["sampler"] if args.vs else [] if args.curves else list(SECTIONS)}
    if args.vs:
        unset.update(VS_TRL_QUICK if args.quick else VS_TRL)
    for k, v in unset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def data_size(args: argparse.Namespace) -> int:
    """Examples per task split: enough distinct batches for the longest run of any section."""
    if args.n_examples:
        return int(args.n_examples)
    return args.batch * (args.warmup + max(args.iters, args.mem_iters))


def _memory_child(args: argparse.Namespace) -> None:
    """Entry of a fresh process measuring one method's memory; prints one MEMORY_MARK line."""
    from harness.bench.memory import measure_memory
    from harness.bench.steps import prepare_data

    device = resolve_device(args.device)
    preset = args.models[0]
    with quiet():
        task, tok = prepare_data(data_size(args), args.cache_dir, args.seed)
    row = measure_memory(args.memory_child, model_config(preset, len(tok), args.lora), task, tok,
                         args.batch, args.mem_iters, args.seed, device, args.minibatch)
    print(MEMORY_MARK + json.dumps(row), flush=True)


def run_bench(args: argparse.Namespace, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the chosen sections for every model, printing each table as it is done."""
    # the sections' modules (Lightning among their imports) only once there is work to do:
    # --help and a bad option answer without them
    from harness.bench.memory import (
        MEMORY_COLUMNS,
        RATIO_COLUMNS,
        measure_memory,
        memory_in_subprocess,
        memory_notes,
        memory_ratios,
        memory_table_rows,
    )
    from harness.bench.steps import (
        PHASE_COLUMNS,
        STEP_COLUMNS,
        bench_method_steps,
        phase_notes,
        phase_table_rows,
        prepare_data,
        rollout_overrides,
        share_prompt_overrides,
        step_notes,
    )

    device = resolve_device(args.device)
    if args.vs == "trl":
        from harness.bench.vs_trl import require_trl

        require_trl()  # before any work: the one message naming the extra
    busy = load_note() if device.type == "cpu" else None
    if busy:
        out(busy + "\n")
    result: dict[str, Any] = {"env": {
        "load_warning": busy, "cpu_count": os.cpu_count(),
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }}
    with contextlib.ExitStack() as stack:
        cache = args.cache_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="harness-bench-")))
        if "sampler" in args.sections:
            rows = [bench_sampler(model_config(m, args.vocab), args.batch, args.prompt_len,
                                  args.new_tokens, args.iters, args.warmup, args.seed, device,
                                  args.precision)
                    for m in args.models]
            result["sampler"] = rows
            out(format_table("1. Sampler throughput: ours (KV cache) vs transformers.generate",
                             rows, sampler_columns(rows), sampler_notes(device)) + "\n")
        need_data = bool({"steps", "memory"} & set(args.sections)) or args.vs is not None
        task = tok = None
        if need_data:
            with quiet():
                task, tok = prepare_data(data_size(args), cache, args.seed)
        if "steps" in args.sections:
            rows = []
            for m in args.models:
                mcfg = model_config(m, len(tok), args.lora)
                for meth in args.methods:
                    overrides = [*share_prompt_overrides(meth, args.share_prompt),
                                 *rollout_overrides(meth, args.rollout_tokens)]
                    rows.append(bench_method_steps(
                        meth, mcfg, task, tok, args.batch, args.iters, args.warmup, args.seed,
                        device, args.minibatch, fused_adamw=args.fused_adamw, overrides=overrides,
                        precision=args.precision, profile=args.profile))
            result["steps"] = rows
            out(format_table("2. Seconds per optimisation step", rows, STEP_COLUMNS,
                             step_notes(device, len(tok))) + "\n")
            if args.profile:
                out(format_table("2b. Where a batch's time goes, by phase", phase_table_rows(rows),
                                 PHASE_COLUMNS, phase_notes()) + "\n")
        if "memory" in args.sections:
            rows = []
            for m in args.models:
                for meth in args.memory_methods:
                    if device.type == "cuda":
                        rows.append(measure_memory(meth, model_config(m, len(tok), args.lora), task, tok,
                                                   args.batch, args.mem_iters, args.seed, device,
                                                   args.minibatch))
                    else:
                        rows.append(memory_in_subprocess(meth, m, args.batch, args.mem_iters,
                                                         args.seed, cache, data_size(args),
                                                         args.minibatch, args.threads, args.lora))
            ratios = memory_ratios(rows)
            result["memory"], result["memory_ratios"] = rows, ratios
            what = " vs ".join(m.upper() for m in args.memory_methods)
            lora = f", LoRA r={args.lora}" if args.lora else ""
            out(format_table(f"3. Peak memory, {what} at {args.batch} sequences per batch{lora}",
                             memory_table_rows(rows), MEMORY_COLUMNS, memory_notes(device, rows)))
            out("\n" + format_table("3b. GRPO / PPO", ratios, RATIO_COLUMNS) + "\n")
        if args.vs == "trl":
            from harness.bench.vs_trl import compare_with_trl

            result["vs_trl"] = [
                compare_with_trl(model_config(m, len(tok)), task, tok, args.batch, args.new_tokens,
                                 args.pairs, args.rounds, args.iters, args.warmup, args.seed,
                                 device, out, steps=args.vs_steps, ppo_prompts=args.ppo_prompts,
                                 fused_adamw=args.fused_adamw, share_prompt=args.share_prompt)
                for m in args.models]
        if args.curves:
            from harness.bench.curves import QUICK as QUICK_CURVES
            from harness.bench.curves import CurveSettings, write_curves

            settings = QUICK_CURVES if args.quick else CurveSettings()
            settings.check()
            with quiet():
                ctask, ctok = prepare_data(settings.n_examples, cache, args.seed)
            command = "python -m harness.bench " + shlex.join(args.argv)
            result["curves"] = write_curves(args.curves, settings, ctask, ctok, args.seed, device,
                                            command, out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        out(f"figures written to {args.json}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``python -m harness.bench``: parse the options and run (or serve as a memory child)."""
    for var in OFFLINE_ENV:
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.memory_child:
            if args.cache_dir is None:
                raise SystemExit("--_memory-child needs --cache-dir")
            _memory_child(args)
            return None
        return run_bench(args)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
