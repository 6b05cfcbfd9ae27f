"""Export a harness task as local lm-eval tasks: JSONL data plus YAMLs rendered with absolute paths.

``export_task_data(task, out_dir)`` writes::

    <out_dir>/<task>/gold.jsonl        held-out prompts (task.eval_dataset()), if the task has a gold reward
    <out_dir>/<task>/pref.jsonl        held-out preference pairs (task.preference_dataset("validation"))
    <out_dir>/<task>/ppl.jsonl         held-out SFT texts (task.sft_dataset("validation"))
    <out_dir>/<task>/manifest.json     what was exported (task class and config, tokens, counts)
    <out_dir>/harness_<task>_gold.yaml   generate_until, metric gold_reward (mean)
    <out_dir>/harness_<task>_pref.yaml   multiple_choice [chosen, rejected], metric acc
    <out_dir>/harness_<task>_ppl.yaml    loglikelihood_rolling, word/byte perplexity, bits per byte
    <out_dir>/harness_<task>.yaml        the group of the three

and returns ``<out_dir>`` (absolute), the folder to give lm-eval as its include path::

    simple_evaluate(..., task_manager=TaskManager(include_path=DIR, include_defaults=False))
    lm_eval --model hf --model_args pretrained=CKPT,... --include_path DIR --tasks harness_arith

The YAMLs are rendered from the templates beside this module (``*.yaml.in``) with the absolute
JSONL paths (lm-eval resolves ``data_files`` against the working directory, not the YAML's folder).
Several tasks can be exported into the same folder.

**Tokens.** The harness's models see ``[bos] + prompt tokens`` and end responses with EOS, and the
harness tokenizer adds neither by itself. The exported text therefore carries them: contexts are
``<bos string> + prompt`` (the tokenizer maps the special-token string to its id, and lm-eval adds
no second BOS to a text that starts with it), preference choices are ``response + <eos string>``.
The perplexity texts carry no BOS: lm-eval conditions their first token on BOS itself. Run lm-eval
with ``add_bos_token=False`` (see :mod:`harness.evaluation.lm_eval_runner`): with ``True`` its
``loglikelihood_rolling`` scores a spurious second BOS (lm-eval issue #3333).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from string import Template
from typing import Any

from harness.evaluation.tasks.functions import (
    CACHE_DIR_FIELD,
    RAW_PROMPT_FIELD,
    TASK_CLASS_FIELD,
    TASK_CONFIG_FIELD,
)
from harness.util.atomic import write_text

log = logging.getLogger(__name__)

__all__ = ["KINDS", "TEMPLATE_DIR", "export_task_data", "group_name", "task_class_path", "task_names"]

#: The lm-eval task kinds exported per harness task.
KINDS: tuple[str, ...] = ("gold", "pref", "ppl")
#: Folder of the YAML templates (``<kind>.yaml.in`` and ``group.yaml.in``).
TEMPLATE_DIR = Path(__file__).resolve().parent
#: Default special-token strings of the harness tokenizer (:mod:`harness.data.tokenizer`).
DEFAULT_BOS, DEFAULT_EOS = "<bos>", "<eos>"
#: Fields the export adds to the rows; a task column of the same name is an error.
_RESERVED = frozenset({"context", "target", "choices", "label", "text",
                       TASK_CLASS_FIELD, TASK_CONFIG_FIELD, CACHE_DIR_FIELD, RAW_PROMPT_FIELD})


def group_name(task_name: str) -> str:
    """``harness_<task>``: the lm-eval group of a harness task."""
    return f"harness_{task_name}"


def task_names(task_name: str, kinds: Iterable[str] = KINDS) -> list[str]:
    """``["harness_<task>_gold", "harness_<task>_pref", "harness_<task>_ppl"]`` (for ``kinds``)."""
    return [f"{group_name(task_name)}_{kind}" for kind in kinds]


def task_class_path(task: Any) -> str:
    """``"package.module:ClassName"`` of ``task``'s class; raises if another process could not import it."""
    cls = type(task)
    if "<locals>" in cls.__qualname__:
        raise ValueError(f"{cls.__qualname__}: a task class defined inside a function cannot be "
                         "rebuilt by lm-eval; define it at module level")
    if cls.__module__ == "__main__":
        log.warning("task class %s lives in __main__: only this process can rebuild it "
                    "(the lm_eval CLI cannot)", cls.__qualname__)
    return f"{cls.__module__}:{cls.__qualname__}"


def _config_json(task: Any) -> str:
    """The task config as a JSON object string (what the task constructor accepts)."""
    cfg = task.config
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        data = dataclasses.asdict(cfg)
    elif isinstance(cfg, Mapping):
        data = dict(cfg)
    else:
        raise TypeError(f"{type(task).__name__}.config is {type(cfg).__name__}: expected a "
                        "dataclass or a mapping")
    data.setdefault("name", task.name)
    return json.dumps(data, sort_keys=True)


def _context(bos: str, prompt: str) -> str:
    """What the model sees before its answer: ``bos + prompt``, as the harness encodes prompts
    (:func:`harness.data.collate.encode_prompt`), which also keeps a chat template's own leading
    BOS single."""
    return prompt if prompt.startswith(bos) else bos + prompt


def _reference(row: Mapping[str, Any]) -> str:
    """A reference answer for ``doc_to_target`` (informational; the gold reward decides)."""
    for key in ("response", "reference", "answer", "chosen"):
        if row.get(key) is not None:
            return str(row[key])
    return ""


def _rows(dataset: Any, limit: int | None) -> list[dict[str, Any]]:
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    rows = dataset.select(range(n)).to_list() if n < len(dataset) else dataset.to_list()
    clash = sorted(_RESERVED & set(rows[0])) if rows else []
    if clash:
        raise ValueError(f"task columns {clash} clash with the fields the lm-eval export adds")
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _render(template: str, out: Path, **values: Any) -> None:
    src = TEMPLATE_DIR / template
    text = Template(src.read_text(encoding="utf-8")).substitute(template=src.name, **values)
    write_text(out, text)


def export_task_data(task: Any, out_dir: str | os.PathLike, *, limit: int | None = None,
                     tokenizer: Any = None, bos_token: str | None = None, eos_token: str | None = None,
                     max_gen_toks: int = 16) -> Path:
    """Write ``task``'s held-out data as JSONL and its lm-eval task YAMLs into ``out_dir``.

    Args:
        task: a harness task (:class:`harness.data.tasks.base.Task`): ``name``, ``config``,
            ``has_gold_reward``, ``eval_dataset()``, ``preference_dataset("validation")``,
            ``sft_dataset("validation")``, ``reward(prompt, response)``.
        out_dir: the include folder (created; several tasks may share it).
        limit: at most this many rows per file (None: all).
        tokenizer: the model's tokenizer, for its BOS / EOS strings (default ``<bos>`` / ``<eos>``,
            the harness tokenizer's); ``bos_token`` / ``eos_token`` override it.
        max_gen_toks: new tokens of the greedy gold-reward completions (the harness's
            ``eval.max_new_tokens``; equal values give equal numbers).

    Returns the absolute include folder (``out_dir``); the module docstring lists its content.
    """
    if max_gen_toks < 1:
        raise ValueError(f"max_gen_toks={max_gen_toks}: must be >= 1")
    bos = bos_token or getattr(tokenizer, "bos_token", None) or DEFAULT_BOS
    eos = eos_token or getattr(tokenizer, "eos_token", None) or DEFAULT_EOS
    name = str(task.name)
    out = Path(out_dir).expanduser().absolute()
    data_dir = out / name
    data_dir.mkdir(parents=True, exist_ok=True)

    # a FormattedTask (chat / alpaca prompts) is rebuilt as the task it formats; each gold row
    # keeps the task's own prompt beside the formatted one (functions.gold_process_results)
    source = getattr(task, "inner", task)
    cls_path, cfg_json = task_class_path(source), _config_json(source)
    cache_root = getattr(source, "cache_root", None)
    kinds = [k for k in KINDS if k != "gold" or getattr(task, "has_gold_reward", False)]
    counts: dict[str, int] = {}

    if "gold" in kinds:
        rows = _rows(task.eval_dataset(), limit)
        for r in rows:
            r.update(context=_context(bos, r["prompt"]), target=_reference(r))
            r[TASK_CLASS_FIELD], r[TASK_CONFIG_FIELD] = cls_path, cfg_json
            r[CACHE_DIR_FIELD] = str(cache_root) if cache_root is not None else ""
            if source is not task:
                r[RAW_PROMPT_FIELD] = task.raw(r["prompt"])
        _write_jsonl(data_dir / "gold.jsonl", rows)
        counts["gold"] = len(rows)
    rows = _rows(task.preference_dataset("validation"), limit)
    for r in rows:
        r.update(context=_context(bos, r["prompt"]), choices=[r["chosen"] + eos, r["rejected"] + eos], label=0)
    _write_jsonl(data_dir / "pref.jsonl", rows)
    counts["pref"] = len(rows)
    rows = _rows(task.sft_dataset("validation"), limit)
    for r in rows:
        r["text"] = r["prompt"] + r["response"]
    _write_jsonl(data_dir / "ppl.jsonl", rows)
    counts["ppl"] = len(rows)

    for kind in kinds:
        _render(f"{kind}.yaml.in", out / f"{group_name(name)}_{kind}.yaml", task=name,
                data_file=json.dumps(str(data_dir / f"{kind}.jsonl")), until=json.dumps([eos]),
                max_gen_toks=int(max_gen_toks))
    _render("group.yaml.in", out / f"{group_name(name)}.yaml", task=name,
            subtasks=json.dumps(task_names(name, kinds)))
    stale = [k for k in KINDS if k not in kinds]
    for kind in stale:  # e.g. a re-export of a task that lost its gold reward
        (out / f"{group_name(name)}_{kind}.yaml").unlink(missing_ok=True)
        (data_dir / f"{kind}.jsonl").unlink(missing_ok=True)

    manifest = {"task": name, "task_class": cls_path, "task_config": json.loads(cfg_json),
                "bos_token": bos, "eos_token": eos, "limit": limit, "max_gen_toks": int(max_gen_toks),
                "counts": counts, "group": group_name(name), "tasks": task_names(name, kinds)}
    write_text(data_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    log.debug("lm-eval: exported %s (%s) to %s", name, counts, out)
    return out
