"""Run lm-evaluation-harness on a checkpoint folder and return flat ``eval/<task>/<metric>`` numbers.

:func:`run_lm_eval` calls ``lm_eval.simple_evaluate(model="hf", ...)`` on a Hugging Face-format
checkpoint (what :func:`harness.models.hf.save_checkpoint` writes), with the tasks found in an
include folder (what :func:`harness.evaluation.tasks.export_task_data` writes) or lm-eval's
built-in tasks; :func:`lm_eval_command` gives the equivalent ``lm_eval`` command line, for the docs
and the leaderboard. lm-eval is imported lazily (importing it takes seconds).

``add_bos_token`` defaults to False: the harness tasks put the BOS string in their contexts (the
model sees ``[bos] + prompt``, as in training) and lm-eval conditions rolling perplexity on BOS by
itself; ``add_bos_token=True`` would make ``loglikelihood_rolling`` score a second, spurious BOS
(lm-eval issue #3333). For lm-eval's built-in tasks on a harness checkpoint (whose tokenizer adds
no BOS by itself), pass ``add_bos_token=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["flatten_results", "lm_eval_command", "lm_eval_results", "model_args", "run_lm_eval"]

FewShot = int | Mapping[str, int] | None


def _max_length(checkpoint_dir: Path) -> int | None:
    """The checkpoint's context length (``max_position_embeddings`` of ``config.json``), if any."""
    try:
        cfg = json.loads((checkpoint_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = cfg.get("max_position_embeddings")
    return int(value) if value else None


def model_args(checkpoint_dir: str | os.PathLike, max_length: int | None = None,
               add_bos_token: bool | None = False, dtype: str = "float32") -> str:
    """lm-eval's ``model_args`` string for the ``hf`` model on ``checkpoint_dir``.

    ``max_length`` defaults to the checkpoint's ``max_position_embeddings`` (transformers 5 saves
    tokenizers with a huge ``model_max_length``, so lm-eval must be told); ``add_bos_token=None``
    leaves the tokenizer's own behaviour.
    """
    ckpt = Path(checkpoint_dir).expanduser().absolute()
    if "," in str(ckpt) or "=" in str(ckpt):
        raise ValueError(f"{ckpt}: lm-eval's model_args cannot hold a path with ',' or '='")
    max_length = max_length if max_length is not None else _max_length(ckpt)
    parts = [f"pretrained={ckpt}", f"dtype={dtype}"]
    if add_bos_token is not None:
        parts.append(f"add_bos_token={bool(add_bos_token)}")
    if max_length is not None:
        parts.append(f"max_length={int(max_length)}")
    return ",".join(parts)


def _by_fewshot(tasks: Sequence[str], num_fewshot: FewShot) -> list[tuple[int | None, list[str]]]:
    """Partition ``tasks`` by their number of few-shot examples (one ``simple_evaluate`` each)."""
    if not isinstance(num_fewshot, Mapping):
        return [(num_fewshot, list(tasks))]
    unknown = sorted(set(num_fewshot) - set(tasks))
    if unknown:
        raise ValueError(f"num_fewshot names tasks {unknown} that are not in tasks={list(tasks)}")
    groups: dict[int | None, list[str]] = {}
    for task in tasks:
        shots = num_fewshot.get(task)
        groups.setdefault(None if shots is None else int(shots), []).append(task)
    return list(groups.items())


def lm_eval_results(checkpoint_dir: str | os.PathLike, include_dir: str | os.PathLike | None,
                    tasks: Sequence[str], limit: int | float | None = None,
                    batch_size: int | str = 16, device: str = "cpu", max_length: int | None = None,
                    num_fewshot: int | None = None, add_bos_token: bool | None = False,
                    include_defaults: bool | None = None, log_samples: bool = False) -> dict[str, Any]:
    """One ``lm_eval.simple_evaluate`` call; returns lm-eval's raw results dict.

    ``include_dir=None`` uses lm-eval's built-in tasks only; ``include_defaults`` (default: only
    when there is no ``include_dir``) adds them to an include folder's tasks (a ~20 s scan).
    ``results["config"]`` holds a ``torch.dtype``: serialise with ``json.dumps(..., default=str)``.
    """
    if not tasks:
        raise ValueError("lm_eval: no tasks given")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:  # lm-eval's hf model imports it
        raise ImportError("lm-eval's 'hf' model needs the 'accelerate' package "
                          "(pip install accelerate, or lm-eval[hf])")
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_defaults is None:
        include_defaults = include_dir is None
    if include_dir is None:
        manager = TaskManager(include_defaults=True)
    else:
        include = Path(include_dir).expanduser().absolute()
        if not include.is_dir():
            raise FileNotFoundError(f"lm_eval include folder {include} does not exist "
                                    "(write it with harness.evaluation.tasks.export_task_data)")
        manager = TaskManager(include_path=str(include), include_defaults=include_defaults)
    with quiet_lm_eval():
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args(checkpoint_dir, max_length, add_bos_token),
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=limit,
            bootstrap_iters=0,
            log_samples=log_samples,
            task_manager=manager,
            verbosity="WARNING",
        )
    if results is None:  # only on non-zero ranks of a distributed run
        return {}
    return results


NOT_A_REPO = "not a git repository"
"""What ``git describe``, run by lm-eval for its results' provenance, writes outside a checkout."""


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Keep lm-eval's progress bars and INFO lines out of the run's console.

    Its progress bars (tqdm, on ``sys.stderr``) are captured and dropped, and so is what the
    processes it starts write to file descriptor 2 (``git describe``'s "fatal: not a git
    repository" when a run starts outside a checkout); any other text written there is passed on
    to the log afterwards, so warnings are not lost.
    """
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer), _fd2_to(buffer):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        for line in buffer.getvalue().replace("\r", "\n").splitlines():
            if line.strip() and "/s]" not in line and "%|" not in line and NOT_A_REPO not in line:
                log.warning("lm_eval: %s", line.strip())


@contextlib.contextmanager
def _fd2_to(buffer: io.StringIO) -> Iterator[None]:
    """Point file descriptor 2 (what child processes inherit as stderr) at a temporary file for
    the block, then append what was written there to ``buffer``."""
    import tempfile

    with tempfile.TemporaryFile() as tmp:
        if sys.__stderr__ is not None:
            sys.__stderr__.flush()  # what was written before the block goes where it was meant to
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buffer.write(tmp.read().decode(errors="replace"))


def flatten_results(results: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{"<prefix>/<task>/<metric>": value}`` from lm-eval's ``results["results"]``.

    lm-eval keys metrics ``"<metric>,<filter>"``: the default filter ``none`` is dropped, another
    filter is kept as ``<metric>/<filter>`` (e.g. gsm8k's ``exact_match/strict-match``); stderr
    entries, keys without a filter (``alias``, ``name``, ``sample_len``) and non-numeric values
    are skipped.
    """
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if not comma or metric.endswith("_stderr"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            name = metric if filt in ("", "none") else f"{metric}/{filt}"
            flat[f"{prefix}/{task}/{name}"] = float(value)
    return flat


def run_lm_eval(checkpoint_dir: str | os.PathLike, include_dir: str | os.PathLike | None,
                tasks: Sequence[str], limit: int | float | None = None, batch_size: int | str = 16,
                device: str = "cpu", max_length: int | None = None, *, num_fewshot: FewShot = None,
                add_bos_token: bool | None = False, include_defaults: bool | None = None,
                output_path: str | os.PathLike | None = None) -> dict[str, float]:
    """Evaluate the HF checkpoint folder ``checkpoint_dir`` on lm-eval ``tasks``; flat metrics.

    Args:
        checkpoint_dir: a Hugging Face-format model folder with its tokenizer.
        include_dir: folder of task YAMLs (``export_task_data``'s), or None for built-in tasks.
        tasks: lm-eval task or group names (e.g. ``["harness_arith"]``).
        limit: documents per task (None: all; a float < 1: a fraction).
        batch_size: lm-eval's batch size (an int, or ``"auto"``).
        device: torch device of the model.
        max_length: context length (default: the checkpoint's ``max_position_embeddings``).
        num_fewshot: few-shot examples: one number for all tasks, or ``{task: shots}`` (tasks with
            different numbers run in separate ``simple_evaluate`` calls); None: each task's own.
        add_bos_token: lm-eval's ``add_bos_token`` model arg (module docstring).
        include_defaults: also index lm-eval's built-in tasks (default: only without include_dir).
        output_path: if given, lm-eval's raw results (all calls) are written there as JSON.

    Returns ``{"eval/<task>/<metric>": value}`` (:func:`flatten_results`), groups included.
    """
    flat: dict[str, float] = {}
    raw: list[dict[str, Any]] = []
    for shots, group in _by_fewshot(tasks, num_fewshot):
        results = lm_eval_results(checkpoint_dir, include_dir, group, limit, batch_size, device,
                                  max_length, shots, add_bos_token, include_defaults)
        raw.append(results)
        flat.update(flatten_results(results))
    if output_path is not None:
        out = Path(output_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = raw[0] if len(raw) == 1 else raw
        out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    log.debug("lm_eval: %s", flat)
    return flat


def lm_eval_command(checkpoint_dir: str | os.PathLike, include_dir: str | os.PathLike | None,
                    tasks: Sequence[str], limit: int | float | None = None, batch_size: int | str = 16,
                    device: str = "cpu", max_length: int | None = None, *, num_fewshot: FewShot = None,
                    add_bos_token: bool | None = False) -> str:
    """The ``lm_eval`` command line equivalent to :func:`run_lm_eval` with the same arguments.

    Tasks with different ``num_fewshot`` give one command each, joined with `` && ``. The CLI
    also computes bootstrap standard errors (``run_lm_eval`` does not); the metrics are the same.
    Run it with ``HF_DATASETS_OFFLINE=1`` (local JSON data) where there is no network.
    """
    commands = []
    for shots, group in _by_fewshot(tasks, num_fewshot):
        argv = ["lm_eval", "--model", "hf",
                "--model_args", model_args(checkpoint_dir, max_length, add_bos_token)]
        if include_dir is not None:
            argv += ["--include_path", str(Path(include_dir).expanduser().absolute())]
        argv += ["--tasks", ",".join(group), "--batch_size", str(batch_size), "--device", device]
        if shots is not None:
            argv += ["--num_fewshot", str(shots)]
        if limit is not None:
            argv += ["--limit", str(limit)]
        commands.append(shlex.join(argv))
    return " && ".join(commands)
