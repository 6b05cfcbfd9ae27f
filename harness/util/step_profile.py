"""Where a training step's time goes: named regions on Lightning's profiler, split into phases.

The methods mark their phases with :meth:`harness.methods.base.AlignmentModule.region`, which
opens ``profiler.profile("[harness]<name>")`` on the trainer's Lightning profiler (a no-op under
Lightning's default ``PassThroughProfiler``). With ``trainer.profiler=simple`` (a run) or
``python -m harness.bench --sections steps --profile`` (the bench), Lightning's
``SimpleProfiler`` records every region's durations and :func:`phase_seconds` turns them into
seconds per training batch of each phase:

* ``sample``: the policy's KV-cached sampling (on-policy methods);
* ``reward``: decoding the responses and scoring them (gold reward or reward model);
* ``reference``: the frozen reference's log-probs of the rollout (DPO: of a batch's pairs the
  first time they are needed, unless scored before training);
* ``value``: the critic's values of the rollout before the update (PPO);
* ``forward``: the trained networks' forward passes and losses (with automatic optimisation --
  SFT, reward model, DPO -- the whole ``training_step``, its logging included, and ``zero_grad``,
  less the phases it marks itself);
* ``backward``: ``loss.backward()`` (Lightning's ``backward`` hook, both optimisation modes);
* ``optimizer``: gradient clipping, the optimiser's and the schedulers' steps;
* ``other``: the rest of the batch (Lightning's loop and hooks, logging of on-policy methods,
  advantages and the Python between phases): ``run_training_batch`` minus the phases.

With automatic optimisation the optimiser's step runs the closure (forward and backward) inside
it: the module records the whole ``optimizer_step`` and the closure as ``[harness]step`` and
``[harness]closure``, and the optimiser's share is their difference.

On a GPU each region synchronises the device at its start and end (only while a profiler
records), so a phase is charged with its own kernels rather than with whatever the host
queued before it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PREFIX = "[harness]"
PHASES: tuple[str, ...] = ("sample", "reward", "reference", "value", "forward", "backward",
                           "optimizer")
"""The leaf regions the methods mark, in the order a step runs them."""
STEP, CLOSURE = "step", "closure"
"""Automatic optimisation's enclosing regions: the whole ``optimizer_step``, and its closure."""
BATCH_ACTION = "run_training_batch"
"""Lightning's profiler action around one whole training batch (both optimisation modes)."""
PROFILERS: tuple[str, ...] = ("simple", "advanced", "pytorch")
"""``trainer.profiler``'s choices: Lightning's profilers by their Trainer names."""


def action(name: str) -> str:
    """The profiler action of the harness region ``name``."""
    return PREFIX + name


def build_profiler(kind: str | None, dirpath: Path | None = None, filename: str | None = None):
    """Lightning's profiler ``kind`` (:data:`PROFILERS`; None: none), writing its report to
    ``dirpath/<Lightning's stage>-<filename>.txt`` when both are given (else to the log)."""
    if kind is None:
        return None
    from lightning.pytorch.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler

    classes = {"simple": SimpleProfiler, "advanced": AdvancedProfiler, "pytorch": PyTorchProfiler}
    if kind not in classes:
        raise ValueError(f"profiler={kind!r}: must be one of {', '.join(PROFILERS)} or null")
    return classes[kind](dirpath=None if dirpath is None else str(dirpath), filename=filename)


def recorded(profiler: Any) -> Mapping[str, Sequence[float]] | None:
    """The durations a Lightning ``SimpleProfiler`` recorded, by action; None for a profiler that
    keeps no durations (advanced, pytorch: their own reports only)."""
    durations = getattr(profiler, "recorded_durations", None)
    return durations if isinstance(durations, Mapping) else None


def counts(durations: Mapping[str, Sequence[float]]) -> dict[str, int]:
    """How many durations each action holds: :func:`phase_seconds` ``since`` a point."""
    return {k: len(v) for k, v in durations.items()}


def phase_seconds(durations: Mapping[str, Sequence[float]],
                  since: Mapping[str, int] | None = None) -> dict[str, float]:
    """Seconds per training batch of each phase (:data:`PHASES` present, then ``other``) and
    ``batch`` (the whole batch), from a ``SimpleProfiler``'s durations, counting only those
    recorded after ``since`` (:func:`counts` at that point; e.g. after warm-up batches).

    optimizer = its own region (manual optimisation) + ``step`` - ``closure`` (automatic);
    other = batch - every phase. Raises ``ValueError`` when no batch was recorded.
    """
    since = since or {}

    def total(key: str) -> float:
        return float(sum(list(durations.get(key, ()))[since.get(key, 0):]))

    batches = len(durations.get(BATCH_ACTION, ())) - since.get(BATCH_ACTION, 0)
    if batches <= 0:
        raise ValueError(f"no training batch recorded ({BATCH_ACTION!r}): was the profiler on?")
    closure = total(action(CLOSURE))
    out: dict[str, float] = {}
    for name in PHASES:
        seconds = total(action(name))
        if name == "optimizer":
            seconds += total(action(STEP)) - closure
        if name == "forward" and closure:
            # automatic optimisation: the closure is training_step + zero_grad + backward, and
            # the regions training_step marks itself (DPO's first look-up of a pair's reference)
            seconds += closure - sum(total(action(p)) for p in PHASES
                                     if p not in ("forward", "optimizer"))
        if any(k in durations for k in _sources(name)):
            out[name] = seconds / batches
    out["batch"] = total(BATCH_ACTION) / batches
    out["other"] = out["batch"] - sum(v for k, v in out.items() if k in PHASES)
    return out


def _sources(name: str) -> tuple[str, ...]:
    """The actions phase ``name`` is computed from."""
    extra = {"optimizer": (action(STEP),), "forward": (action(CLOSURE),)}
    return (action(name), *extra.get(name, ()))


def phase_rows(split: Mapping[str, float]) -> list[dict[str, Any]]:
    """:func:`phase_seconds` as table rows: phase, s/batch, share of the batch."""
    batch = split["batch"]
    names = [n for n in (*PHASES, "other") if n in split]
    return [{"phase": n, "s_per_batch": split[n],
             "share": 100.0 * split[n] / batch if batch > 0 else float("nan")} for n in names]


def format_split(split: Mapping[str, float], title: str) -> str:
    """A phase split as a few aligned lines under ``title``."""
    lines = [title]
    for row in phase_rows(split):
        lines.append(f"  {row['phase']:<10} {row['s_per_batch']:9.4f} s  {row['share']:5.1f}%")
    lines.append(f"  {'batch':<10} {split['batch']:9.4f} s")
    return "\n".join(lines)
