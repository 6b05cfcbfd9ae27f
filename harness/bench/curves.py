"""5. ``--curves DIR``: how a step's cost grows with the model, the batch and the response length.

Three sweeps of :func:`harness.bench.steps.bench_method_steps` (the real Lightning modules, as the
steps section times them), each varying one axis from a base point and holding the rest:

- **model size**: the presets of ``CurveSettings.models`` (random-init; a pretrained preset keeps
  its checkpoint's shape and vocabulary) at ``batch`` sequences;
- **batch**: ``CurveSettings.batches`` sequences per step on ``base_model``;
- **response length**: ``max_new_tokens`` of ``CurveSettings.new_tokens`` for the sampling methods
  (GRPO, PPO) on ``base_model`` (SFT and DPO read their lengths from the data).

For every (method, axis) the growth is fitted as a power law ``s/step = c * x^a`` by least squares
on ``log s = log c + a log x`` (:func:`fit_power_law`): ``a = 1`` is linear growth, ``a < 1`` a
step whose fixed costs (per-op overhead, the optimiser over the weights) are not yet amortised.
Writes ``cost_curves.json`` (every point), ``cost_curves.md`` (tables, exponents, the command,
the machine) and ``cost_curves.png`` (three log-log panels).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from harness.bench.common import model_config
from harness.bench.flops import matmul_gflops
from harness.bench.steps import bench_method_steps, precompute_reference
from harness.models.param_count import meta_model

SAMPLING = ("grpo", "ppo", "rloo")
"""Methods whose step samples responses: the only ones with a response-length axis."""


@dataclass(frozen=True)
class CurveSettings:
    """The three sweeps' points (``--curves``; ``QUICK`` for the smoke test)."""

    methods: tuple[str, ...] = ("sft", "dpo", "grpo", "ppo")
    models: tuple[str, ...] = ("llama_tiny", "llama_small", "llama_25m", "smollm2_135m")
    base_model: str = "llama_small"
    batch: int = 16
    batches: tuple[int, ...] = (8, 16, 32, 64)
    new_tokens: tuple[int, ...] = (8, 16, 32, 64)
    base_new_tokens: int = 16
    iters: int = 5
    warmup: int = 1

    def check(self) -> None:
        for name in ("batch", "iters", "base_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--curves: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("models", "batches", "new_tokens"):
            if len(getattr(self, name)) < 2:
                raise ValueError(f"--curves: {name} needs >= 2 points to fit a growth")
        from harness.registry import stage_names

        if unknown := [m for m in self.methods if m not in stage_names()]:
            raise ValueError(f"--curves: unknown methods {unknown}; choose from "
                             f"{', '.join(stage_names())}")
        if min(self.batches) < 2:
            raise ValueError("--curves: batches must be >= 2 (a group method needs 2 sequences)")

    @property
    def n_examples(self) -> int:
        """Examples per task split the sweeps need (distinct batches for the largest one)."""
        return max(self.batches + (self.batch,)) * (self.warmup + self.iters)


QUICK = CurveSettings(methods=("sft", "grpo"), models=("llama_tiny", "moe_tiny"),
                      base_model="llama_tiny", batch=4, batches=(2, 4), new_tokens=(2, 4),
                      base_new_tokens=2, iters=1, warmup=1)


def n_params(cfg: Any) -> int:
    """Parameters of a preset's network (shapes only: the meta device)."""
    return sum(p.numel() for p in meta_model(cfg).parameters())


def fit_power_law(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = c * x^a`` through the points, fitted on logs: returns ``(a, c)``.

    ``a = cov(log x, log y) / var(log x)``, ``log c = mean(log y) - a mean(log x)``.
    """
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("a power law needs >= 2 (x, y) pairs")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((x - mx) ** 2 for x in lx)
    if var == 0:
        raise ValueError("a power law needs >= 2 distinct x values")
    a = sum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True)) / var
    return a, math.exp(my - a * mx)


def _point(axis: str, x: float, method: str, row: dict[str, Any], new_tokens: int,
           ) -> dict[str, Any]:
    """One measured point: the step's seconds and tokens/s at ``x`` on ``axis``."""
    return {"axis": axis, "x": x, "method": method, "model": row["model"],
            "new_tokens": new_tokens if method in SAMPLING else None,
            "sequences": row["sequences"], "s_per_step": row["s_per_batch"],
            "tokens_per_s": row["tokens_per_batch"] / row["s_per_batch"],
            "tokens_per_step": row["tokens_per_batch"]}


def measure_curves(settings: CurveSettings, task: Any, tok: Any, seed: int,
                   device: torch.device, progress: Callable[[str], None] = print,
                   ) -> list[dict[str, Any]]:
    """Every point of the three sweeps (see the module docstring), in the order measured."""
    settings.check()
    points: list[dict[str, Any]] = []

    def step(method: str, preset: str, batch: int, new_tokens: int) -> dict[str, Any]:
        cfg = model_config(preset, len(tok))
        overrides = [f"method.rollout.max_new_tokens={new_tokens}"] if method in SAMPLING else []
        tokens = f"new tokens {new_tokens:3d}" if overrides else ""
        progress(f"  {method:5s} {preset:14s} batch {batch:3d} {tokens}".rstrip())
        return bench_method_steps(method, cfg, task, tok, batch, settings.iters, settings.warmup,
                                  seed, device, overrides=overrides,
                                  before_fit=lambda setup: precompute_reference(setup.module, device))

    for preset in settings.models:
        size = n_params(model_config(preset, len(tok)))
        for method in settings.methods:
            points.append(_point("params", size, method,
                                 step(method, preset, settings.batch, settings.base_new_tokens),
                                 settings.base_new_tokens))
    for batch in settings.batches:
        for method in settings.methods:
            points.append(_point("batch", batch, method,
                                 step(method, settings.base_model, batch, settings.base_new_tokens),
                                 settings.base_new_tokens))
    for n in settings.new_tokens:
        for method in settings.methods:
            if method in SAMPLING:
                points.append(_point("new_tokens", n, method,
                                     step(method, settings.base_model, settings.batch, n), n))
    return points


AXES: dict[str, str] = {"params": "parameters", "batch": "sequences per step",
                        "new_tokens": "new tokens per response"}


def growth(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fitted exponent of s/step and of tokens/s for every (axis, method) with >= 2 points."""
    out = []
    for axis in AXES:
        for method in dict.fromkeys(p["method"] for p in points):
            ps = [p for p in points if p["axis"] == axis and p["method"] == method]
            if len({p["x"] for p in ps}) < 2:
                continue
            a, _ = fit_power_law([p["x"] for p in ps], [p["s_per_step"] for p in ps])
            b, _ = fit_power_law([p["x"] for p in ps], [p["tokens_per_s"] for p in ps])
            top = sorted(ps, key=lambda p: p["x"])[-2:]  # where fixed costs matter least
            a_top, _ = fit_power_law([p["x"] for p in top], [p["s_per_step"] for p in top])
            out.append({"axis": axis, "method": method, "s_exponent": a, "tokens_per_s_exponent": b,
                        "s_exponent_top": a_top, "x_min": min(p["x"] for p in ps),
                        "x_max": max(p["x"] for p in ps)})
    return out


def repeats(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Configurations measured more than once (the base point lies on every axis): their s/step
    values and max/min, the run-to-run spread every other point carries too."""
    seen: dict[tuple, list[float]] = {}
    for p in points:
        seen.setdefault((p["method"], p["model"], p["sequences"], p["new_tokens"]), []).append(
            p["s_per_step"])
    return [{"method": k[0], "model": k[1], "sequences": k[2], "new_tokens": k[3], "s": v,
             "spread": max(v) / min(v)} for k, v in seen.items() if len(v) > 1]


def plot_curves(points: Sequence[dict[str, Any]], fits: Sequence[dict[str, Any]], path: Path,
                title: str) -> None:
    """Three log-log panels (one per axis): s/step of every method, with its fitted exponent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (axis, label) in zip(axes, AXES.items(), strict=True):
        for method in dict.fromkeys(p["method"] for p in points):
            ps = sorted((p for p in points if p["axis"] == axis and p["method"] == method),
                        key=lambda p: p["x"])
            if not ps:
                continue
            fit = next((f for f in fits if f["axis"] == axis and f["method"] == method), None)
            name = method.upper() + (f"  (x^{fit['s_exponent']:.2f})" if fit else "")
            ax.plot([p["x"] for p in ps], [p["s_per_step"] for p in ps], marker="o", label=name)
        if axis == "params":
            for p in points:
                if p["axis"] == axis and p["method"] == points[0]["method"]:
                    ax.annotate(p["model"], (p["x"], p["s_per_step"]), fontsize=7,
                                textcoords="offset points", xytext=(3, -10))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_markdown(points: Sequence[dict[str, Any]], fits: Sequence[dict[str, Any]],
                    settings: CurveSettings, command: str, env: dict[str, Any]) -> str:
    """The report: what was measured, every point, the fitted exponents, the command."""
    lines = [
        "# Cost curves: seconds per step against model size, batch and response length", "",
        f"Command: `{command}`", "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch {env['torch']}, "
        f"{env['threads']} threads, device {env['device']}; commit {env['commit']}. fp32 1024² "
        "matmul rate before / after the sweeps: "
        + " / ".join(f"{g:.0f}" for g in env.get("peak_gflops_1024", [])) + " GFLOP/s (a "
        "machine shared with other work drifts; the spread below says by how much).", "",
        "Each point: median wall time of one Lightning training batch (the steps section's "
        f"timer) over {settings.iters} batches after {settings.warmup} warm-up, random-init "
        "weights, the arith task; one batch = one optimiser step for SFT and DPO (B/2 pairs; "
        "DPO's reference log-probs scored before the clock starts, as a run scores each pair's "
        "once), one "
        "rollout with its updates for GRPO and PPO (each method's default config, only sizes "
        "set). tokens/s = tokens trained on per step (attention-mask tokens summed over "
        "optimisation passes) / s per step. Growth: least squares of log s/step on log x "
        "(s ∝ x^a; a = 1 is linear).", "",
        "## Fitted growth", "",
        "a: fitted over every point of the axis; a (top 2): between its two largest points, "
        "where per-op overhead and other fixed costs weigh least.", "",
        "| axis | method | range | s/step ∝ x^a | a (top 2) | tokens/s ∝ x^b |",
        "|---|---|---|---:|---:|---:|",
    ]
    for f in fits:
        rng = f"{f['x_min']:,.0f}–{f['x_max']:,.0f}"
        lines.append(f"| {AXES[f['axis']]} | {f['method']} | {rng} | {f['s_exponent']:.2f} | "
                     f"{f['s_exponent_top']:.2f} | {f['tokens_per_s_exponent']:.2f} |")
    reps = repeats(points)
    if reps:
        lines += ["", "## Run-to-run spread", "",
                  "The base configuration lies on every axis, so it was measured more than once in "
                  "this run; max/min of its s/step is the noise any single point carries (read "
                  "exponents over a narrow range, e.g. a (top 2), with it in mind).", "",
                  "| method | model | sequences | new tokens | s/step, each time | max/min |",
                  "|---|---|---:|---:|---|---:|"]
        for r in reps:
            each = ", ".join(f"{x:.4f}" for x in r["s"])
            nt = "-" if r["new_tokens"] is None else r["new_tokens"]
            lines.append(f"| {r['method']} | {r['model']} | {r['sequences']} | {nt} | {each} | "
                         f"{r['spread']:.2f} |")
    lines += ["", "## Points", "", "| axis | x | model | method | sequences | s/step | tokens/step | "
              "tokens/s |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for p in points:
        lines.append(f"| {AXES[p['axis']]} | {p['x']:,.0f} | {p['model']} | {p['method']} | "
                     f"{p['sequences']} | {p['s_per_step']:.4f} | {p['tokens_per_step']:,.0f} | "
                     f"{p['tokens_per_s']:,.0f} |")
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in asdict(settings).items()), ""]
    return "\n".join(lines)


def machine(device: torch.device) -> dict[str, Any]:
    """What the report names as the machine: the run records' platform fields
    (:func:`harness.evaluation.platform.platform_info`), the core count and the commit."""
    import os

    from harness.evaluation.platform import platform_info
    from harness.evaluation.records import git_commit

    info = platform_info(device.type)
    cpu = info["processor"] + (f"; GPU {info['gpu']}" if info["gpu"] else "")
    commit = git_commit(Path(__file__).parent)
    return {"cpu": cpu, "cpu_capability": info["cpu_capability"], "cpu_count": os.cpu_count(),
            "torch": info["torch"], "threads": info["threads"], "device": info["device"],
            "commit": commit[:7] if commit else "unknown"}


def write_curves(out_dir: Path, settings: CurveSettings, task: Any, tok: Any, seed: int,
                 device: torch.device, command: str, out: Callable[[str], None] = print,
                 ) -> dict[str, Any]:
    """Measure the sweeps and write ``cost_curves.{json,md,png}`` into ``out_dir``."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    out(f"5. Cost curves -> {out_dir}")
    peak = [matmul_gflops(1024, device=device)]  # the machine's speed before and after
    points = measure_curves(settings, task, tok, seed, device, out)
    peak.append(matmul_gflops(1024, device=device))
    fits = growth(points)
    env = {**machine(device), "peak_gflops_1024": peak}
    result = {"settings": asdict(settings), "env": env, "command": command, "points": points,
              "growth": fits, "repeats": repeats(points)}
    (out_dir / "cost_curves.json").write_text(json.dumps(result, indent=2))
    (out_dir / "cost_curves.md").write_text(curves_markdown(points, fits, settings, command, env))
    plot_curves(points, fits, out_dir / "cost_curves.png",
                f"Seconds per step (log-log), {env['cpu']}, {env['threads']} threads, "
                f"commit {env['commit']}")
    for f in fits:
        out(f"  {AXES[f['axis']]:24s} {f['method']:5s} s/step ∝ x^{f['s_exponent']:.2f} "
            f"(top two points: x^{f['s_exponent_top']:.2f})")
    return result

