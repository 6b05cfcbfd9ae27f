"""Run records: one JSON file per evaluated run ("results are data").

A record is a JSON object::

    {"run_id": str, "status": "ok" | "failed", "error": str | None,
     "method": str, "model": str, "dataset": str, "seed": int, "group": str | None,
     "metrics": {name: float}, "cost": {name: float},
     "cache_keys": {"sft": str, "rm": str | None},
     "config": {...resolved config...},
     "harness_version": str, "git_commit": str | None, "created": ISO-8601 time,
     "platform": {"torch", "device", "cpu_capability", "threads", "gpu", ...},  # where it ran
     "per_prompt": {"split", "prompts_sha256", "gold_reward": [...], "ref_gold_reward": [...]},
     "reward_source": "gold" | "rm" | None,          # what train/reward measures
     "track": "oracle" | "preferences" | "",          # what the method learns from (track_of)
     "config_hash": str,                              # config_hash(config): what it computed
     "history": {"train/reward": [[step, value], ...], "train/kl": [...],
                 "eval/gold_reward": [[step, value, trained_tokens, wall_s], ...]}}   # optional

``cost`` holds ``cost/wall_s`` (the whole run), ``cost/peak_mem_mb``, ``cost/<stage>/wall_s``,
``cost/<stage>/peak_mem_mb`` and ``cost/<stage>/cached`` for each stage (sft, rm, the method, eval;
a cached stage reports what it spent when it was trained), ``cost/method_wall_s`` /
``cost/method_peak_mem_mb`` for the aligning method's own stage and its ``cost/gen_tokens_per_s``
and ``cost/train_tokens_per_s`` (see :mod:`harness.evaluation.cost`).

Records live in ``<runs_dir>/<run_id>.json``. They are written atomically (temporary file in the
same folder, ``fsync``, then a hard link to the final name), so concurrent writers — a multirun
sweep, several machines sharing a folder — never leave a half-written or corrupt record; a
``run_id`` is unique (:func:`new_run_id`) and a record is never replaced. The leaderboard
(:mod:`harness.evaluation.leaderboard`) is a pure function of the records that
:func:`load_records` returns.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import re
import subprocess
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.config import OFFLINE_PAIR_METHODS
from harness.util.atomic import write_text

__all__ = [
    "RECORD_STATUSES",
    "SCHEMA_VERSION",
    "TRACKS",
    "finite",
    "git_commit",
    "harness_version",
    "is_number",
    "config_hash",
    "finished_record",
    "load_records",
    "record_text",
    "new_record",
    "new_run_id",
    "now_iso",
    "track_of",
    "validate_record",
    "write_record",
]

RECORD_STATUSES = ("ok", "failed")
SCHEMA_VERSION = 2
"""The record format this harness writes: 2 added ``schema_version``, ``track`` and
``config_hash``; 1 (no ``schema_version`` field) is every record before them."""
SCHEMA_VERSIONS = (1, 2)
"""The record formats this harness reads."""
TRACKS = ("oracle", "preferences")
"""The information tracks: what a method learns from. ``oracle``: the task's exact (gold) reward;
``preferences``: the task's preference pairs, directly (offline DPO) or through the reward model
trained on them (``reward_source=rm``). A comparison of methods holds within one track."""


def track_of(record: Mapping[str, Any]) -> str:
    """A record's track: its ``track`` field, else (records written before it existed) from its
    ``reward_source`` and method: ``gold`` -> ``oracle``, ``rm`` or an offline pair method ->
    ``preferences``; ``""`` for a stage that aligns nothing (sft, rm)."""
    track = record.get("track")
    if isinstance(track, str) and track in TRACKS:
        return track
    source = record.get("reward_source")
    if source == "gold":
        return "oracle"
    if source == "rm" or record.get("method") in OFFLINE_PAIR_METHODS:
        return "preferences"
    return ""
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+,@-]*$")


# --------------------------------------------------------------------------- provenance
def git_commit(path: Path | str | None = None) -> str | None:
    """The commit (``git rev-parse HEAD``) of the repository containing ``path`` (default: cwd).

    Returns ``None`` when ``path`` is not inside a git work tree, the repository has no commit
    yet, or git is not installed.
    """
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=str(path) if path is not None else None,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = proc.stdout.strip()
    if proc.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", sha):
        return None
    return sha


def harness_version() -> str:
    """The installed version of the ``harness`` distribution, or ``"0+unknown"``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("harness")
    except PackageNotFoundError:
        return "0+unknown"


def now_iso() -> str:
    """The current time as ISO-8601 with a UTC offset, e.g. ``2026-11-24T13:30:12+00:00``."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def new_record(
    *,
    run_id: str,
    method: str,
    model: str,
    dataset: str,
    seed: int,
    status: str = "ok",
    error: str | None = None,
    group: str | None = None,
    metrics: Mapping[str, float] | None = None,
    cost: Mapping[str, float] | None = None,
    cache_keys: Mapping[str, str | None] | None = None,
    config: Mapping[str, Any] | None = None,
    history: Mapping[str, list[list[float]]] | None = None,
    platform: Mapping[str, Any] | None = None,
    per_prompt: Mapping[str, Any] | None = None,
    reward_source: str | None = None,
    track: str | None = None,
    repo_path: Path | str | None = None,
) -> dict[str, Any]:
    """Build a record with the provenance fields (version, commit, time) filled in.

    ``repo_path`` is where :func:`git_commit` looks (default: the current directory). The result
    passes :func:`validate_record`; ``history`` is left out when ``None``.
    """
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "status": status,
        "error": error,
        "method": method,
        "model": model,
        "dataset": dataset,
        "seed": int(seed),
        "group": group,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "cost": {k: float(v) for k, v in (cost or {}).items()},
        "cache_keys": dict(cache_keys or {"sft": None, "rm": None}),
        "config": dict(config or {}),
        "harness_version": harness_version(),
        "git_commit": git_commit(repo_path),
        "created": now_iso(),
        "platform": dict(platform) if platform is not None else None,
        "per_prompt": dict(per_prompt) if per_prompt is not None else None,
        "reward_source": reward_source,
        "config_hash": config_hash(config or {}),
    }
    record["track"] = track if track is not None else track_of(record)
    if history is not None:
        record["history"] = {k: [list(p) for p in v] for k, v in history.items()}
    validate_record(record)
    return record


# --------------------------------------------------------------------------- validation
def validate_record(record: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` when ``record`` cannot be written or aggregated.

    Checked (the record format, :data:`SCHEMA_VERSION`): ``run_id`` is a non-empty string usable
    as a file name (letters, digits and ``._=+,@-``, not starting with a dot), ``status`` is
    ``"ok"`` or ``"failed"``, ``method``, ``model`` and ``dataset`` are strings, ``seed`` an
    integer >= 0, ``metrics`` and ``cost`` flat mappings of names to numbers (NaN allowed),
    ``config`` / ``history`` / ``platform`` / ``per_prompt`` mappings and ``group`` / ``created``
    / ``error`` strings when present, and ``schema_version`` (1 when absent: records written
    before it) one this harness reads.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"a record must be a mapping, got {type(record).__name__}")
    run_id = record.get("run_id")
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(
            f"record run_id must be a file-name-safe string ([A-Za-z0-9._=+,@-], not starting "
            f"with '.'), got {run_id!r}"
        )
    if record.get("status") not in RECORD_STATUSES:
        raise ValueError(f"record {run_id}: status must be one of {RECORD_STATUSES}, "
                         f"got {record.get('status')!r}")
    for key in ("method", "model", "dataset"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"record {run_id}: {key!r} must be a string, got {record.get(key)!r}")
    version = record.get("schema_version", 1)
    if version not in SCHEMA_VERSIONS or isinstance(version, bool):
        raise ValueError(f"record {run_id}: schema_version {version!r} is not one this harness "
                         f"reads ({', '.join(map(str, SCHEMA_VERSIONS))})")
    seed = record.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"record {run_id}: 'seed' must be an integer >= 0, got {seed!r}")
    for key in ("metrics", "cost"):
        values = record.get(key)
        if not isinstance(values, Mapping):
            raise ValueError(f"record {run_id}: {key!r} must be a mapping of names to numbers, "
                             f"got {type(values).__name__}")
        for name, value in values.items():
            if not is_number(value):
                raise ValueError(f"record {run_id}: {key}[{name!r}] must be a number, got "
                                 f"{type(value).__name__}")
    for key in ("config", "history", "platform", "per_prompt"):
        if record.get(key) is not None and not isinstance(record[key], Mapping):
            raise ValueError(f"record {run_id}: {key!r} must be a mapping")
    for key in ("group", "created", "error"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise ValueError(f"record {run_id}: {key!r} must be a string")


def _json_default(obj: Any) -> Any:
    """Serialise what ``json`` cannot: paths, sets, numpy/torch scalars, dates; else ``str``."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        with contextlib.suppress(Exception):
            value = item()
            if isinstance(value, int | float | bool):
                return value
    return str(obj)


# --------------------------------------------------------------------------- write / load
def write_record(record: Mapping[str, Any], runs_dir: Path | str) -> Path:
    """Validate ``record`` and write it atomically to ``<runs_dir>/<run_id>.json``.

    Creates ``runs_dir`` if needed; never replaces a record: an existing file of the same
    ``run_id`` raises :class:`FileExistsError` and is left as it was (run ids are unique:
    :func:`new_run_id`). Non-finite floats are written as JSON ``NaN`` / ``Infinity`` (which
    :func:`load_records` reads back); values JSON cannot hold (paths, numpy scalars, ...) are
    converted. Returns the path written.
    """
    validate_record(record)
    return write_text(Path(runs_dir) / f"{record['run_id']}.json", record_text(record),
                      replace=False)


def record_text(record: Mapping[str, Any]) -> str:
    """``record`` as the text of its file: JSON indented by 2 with every list that holds no object
    on one line (a history's ``[[step, value], ...]``, a per-prompt list), and a final newline.

    Why not ``json.dumps(indent=2)``: it puts every number of a list on a line of its own, which made
    the per-step histories two thirds of a record's bytes and the committed records larger than a
    device call carries (64 MiB). The values are the same: ``json.loads`` of the text equals
    ``json.loads(json.dumps(record))`` (values JSON cannot hold converted by :func:`_json_default`,
    non-finite floats as ``NaN`` / ``Infinity``).
    """
    plain = json.loads(json.dumps(record, default=_json_default, allow_nan=True))
    return _compact(plain, 0) + "\n"


def _compact(value: Any, depth: int) -> str:
    inner = "  " * (depth + 1)
    if isinstance(value, dict) and value:
        items = (f"{inner}{json.dumps(k)}: {_compact(v, depth + 1)}" for k, v in value.items())
        return "{\n" + ",\n".join(items) + "\n" + "  " * depth + "}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        items = (inner + _compact(v, depth + 1) for v in value)
        return "[\n" + ",\n".join(items) + "\n" + "  " * depth + "]"
    return json.dumps(value, allow_nan=True)


def new_run_id(method: str, model: str, dataset: str, seed: int) -> str:
    """A run's id, unique and file-name safe: ``<method>_<model>_<dataset>_s<seed>_<12 hex>``,
    the names with any character outside ``[A-Za-z0-9_.-]`` as ``-``, the hex digits random.
    Never derived from a folder name, so two runs never share one."""
    import secrets

    names = "_".join(re.sub(r"[^A-Za-z0-9_.-]", "-", str(x)) for x in (method, model, dataset))
    return f"{names}_s{seed}_{secrets.token_hex(6)}".lstrip(".")


#: top-level config fields that change where a run writes or how loudly, not what it computes
CONFIG_HASH_IGNORES = ("cache_dir", "results_dir", "logger", "log_level", "force_retrain",
                       "skip_done")


def finished_record(runs_dir: Path | str, config: Mapping[str, Any],
                    platform: Mapping[str, Any] | None) -> Path | None:
    """The record in ``runs_dir`` of an ``ok`` run of ``config`` (the same :func:`config_hash`)
    on the same platform (:func:`~harness.evaluation.stats.platform_identity`), if there is one:
    that run need not run again. Each record's hash is computed again from its config (the
    definition of the hash may have changed since it was written). Unreadable files are passed
    over."""
    from harness.evaluation.stats import platform_identity

    want, where = config_hash(config), platform_identity(platform)
    for path in sorted(Path(runs_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if (isinstance(record, dict) and record.get("status") == "ok"
                and isinstance(record.get("config"), Mapping)
                and config_hash(record["config"]) == want
                and platform_identity(record.get("platform")) == where):
            return path
    return None


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of a run's resolved config as canonical JSON (sorted keys), without the fields of
    :data:`CONFIG_HASH_IGNORES`, without the sections of base stages the run does not build on
    (:func:`without_unused_stages`) and without a stage field added later at its default
    (:func:`without_later_defaults`): two runs with one hash computed the same thing (on one
    platform); a field that a new version adds, or a new recipe of a stage a run never used (the
    reward model, for a run on the gold reward), does not orphan the records made before it."""
    used = without_unused_stages(config)
    kept = {k: v for k, v in without_later_defaults(used).items() if k not in CONFIG_HASH_IGNORES}
    text = json.dumps(kept, sort_keys=True, default=_json_default, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def without_unused_stages(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the sections of the base stages (``sft``, ``rm``) that its run does not
    build on (:func:`harness.registry.stage_chain` from the method's stage): e.g. ``rm`` for a
    method on the gold reward, which never trains or reads a reward model. A config whose method
    is not registered, or whose sections no longer fit their schemas (a record of another
    version), is returned whole."""
    from harness.config import ConfigError, to_dataclass
    from harness.registry import base_stages, stage_chain, stage_config, stage_names

    out = dict(config)
    method = out.get("method")
    name = method.get("name") if isinstance(method, Mapping) else None
    if name not in stage_names():
        return out
    bases = base_stages()

    def config_of(stage: str) -> Any:  # a base stage is configured in its own section
        return to_dataclass(stage_config(stage), out[stage if stage in bases else "method"])

    try:
        used = stage_chain(name, config_of)
    except (ConfigError, KeyError, TypeError, ValueError):
        return out
    return {k: v for k, v in out.items() if k not in bases or k in used}


def without_later_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without the stage-config fields marked as added later
    (:data:`harness.methods.config.LATER`) that hold their default, in the method's section and
    each base stage's (``sft``, ``rm``); every other field as it is."""
    from dataclasses import MISSING, asdict, fields, is_dataclass

    from harness.registry import base_stages, stage_config, stage_names

    out = dict(config)
    method = out.get("method")
    sections = {b: b for b in base_stages()}
    if isinstance(method, Mapping):
        sections["method"] = method.get("name")
    for section, stage in sections.items():
        values = out.get(section)
        if stage not in stage_names() or not isinstance(values, Mapping):
            continue
        later = {}
        for f in fields(stage_config(stage)):
            if f.metadata.get("later"):
                default = f.default if f.default is not MISSING else f.default_factory()
                later[f.name] = asdict(default) if is_dataclass(default) else default
        if any(values.get(k, MISSING) == v for k, v in later.items()):
            out[section] = {k: v for k, v in values.items()
                            if not (k in later and v == later[k])}
    return out


def load_records(runs_dir: Path | str, rejected: list[tuple[Path, str]] | None = None,
                 ) -> list[dict[str, Any]]:
    """All valid records in ``runs_dir`` (``*.json``), sorted by file name.

    Files that cannot be read, are not valid JSON, or are not valid records
    (:func:`validate_record`) are left out with a ``UserWarning`` naming the file and the reason,
    and appended to ``rejected`` as ``(path, reason)`` when it is given (the leaderboard lists
    them). Temporary files of in-flight writes (hidden ``.*.tmp`` files) are ignored. A missing
    folder gives ``[]`` with a warning.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        warnings.warn(f"no runs folder at {runs_dir}: no records", UserWarning, stacklevel=2)
        return []
    records: list[dict[str, Any]] = []
    for path in sorted(runs_dir.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            validate_record(record)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            warnings.warn(f"skipping unreadable run record {path}: {exc}", UserWarning,
                          stacklevel=2)
            if rejected is not None:
                rejected.append((path, str(exc)))
            continue
        records.append(record)
    return records


def is_number(value: Any) -> bool:
    """True for ints and floats (NaN included) but not for bools."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    """True for a finite int/float (not a bool)."""
    return is_number(value) and math.isfinite(value)
