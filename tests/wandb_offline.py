"""Read an offline W&B run back from disk (wandb >= 0.19 ships no reader for ``.wandb`` files).

An offline run is a folder ``wandb/offline-run-<time>-<id>/`` holding ``run-<id>.wandb`` and
``files/`` (tables as JSON under ``files/media/table/``). The ``.wandb`` file uses LevelDB's log
format:

* a 7-byte file header: ``b":W&B"``, the magic ``0xBEE1`` (little-endian), version ``0``;
* then 32 KiB blocks of records, each with a 7-byte header — crc32 ``<I`` (zlib's CRC-32 over the
  type byte and the payload), payload length ``<H``, type ``B`` (1 full, 2 first, 3 middle,
  4 last fragment). A block tail shorter than a header is zero padding;
* each reassembled payload is a ``wandb.proto.wandb_internal_pb2.Record`` protobuf whose
  ``record_type`` is ``run`` / ``config`` / ``history`` / ``summary`` / ``files`` / ``exit`` / ...

Items carry a ``key`` or a ``nested_key`` path and a JSON ``value_json``. Records are buffered by
the W&B service until ``run.finish()``; call ``wandb.teardown()`` (or poll
:attr:`OfflineRun.complete`) before reading a run written by the same process.

Usage::

    from wandb_offline import find_runs, read_run
    for run_dir in find_runs("wandb"):
        run = read_run(run_dir)
        print(run.name, run.group, run.summary.get("eval/gold_reward"))
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["OfflineRun", "WandbFileError", "find_runs", "iter_records", "read_run"]

_BLOCK = 32 * 1024
_HEADER = struct.Struct("<IHB")  # crc32, length, type
_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_IDENT, _MAGIC, _VERSION = b":W&B", 0xBEE1, 0
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_INTERNAL_KEYS = ("_wandb",)


class WandbFileError(ValueError):
    """The file is not a W&B run file (wrong header)."""


@dataclass
class OfflineRun:
    """Everything an offline W&B run recorded, read back from its folder.

    ``config`` and ``summary`` are nested dicts (W&B's internal ``_wandb`` entry removed; summary
    keeps ``_step``, ``_runtime``, ``_timestamp``); ``history`` has one dict per logged step with
    ``_step`` set; ``tables`` maps the logged key (or, for tables no summary entry points to, the
    file stem without ``.table.json``) to the table JSON (``{"columns": [...], "data": [...]}``);
    ``files`` lists paths relative to the run's ``files/`` folder. ``complete`` tells whether the
    run's ``exit`` record was found (i.e. ``finish()`` got through).
    """

    path: Path
    run_id: str = ""
    name: str = ""
    project: str = ""
    entity: str = ""
    group: str = ""
    job_type: str = ""
    notes: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    complete: bool = False
    exit_code: int | None = None

    def metric(self, key: str) -> list[tuple[int, Any]]:
        """``[(step, value), ...]`` of one history key, in logging order."""
        return [(row["_step"], row[key]) for row in self.history if key in row]


# --------------------------------------------------------------------------- low-level reader
def iter_records(path: Path | str) -> Iterator[Any]:
    """Yield the ``wandb_internal_pb2.Record`` protobufs of a ``.wandb`` file, in order.

    Raises :class:`WandbFileError` on a wrong file header. A record with a bad checksum or a
    broken fragment sequence is skipped with a warning; a truncated tail (a run still being
    written) ends the iteration quietly.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise WandbFileError(f"{path}: too short to be a W&B run file")
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != _IDENT or magic != _MAGIC or version != _VERSION:
        raise WandbFileError(f"{path}: not a W&B run file (header {data[:7]!r})")

    pos, pending = _FILE_HEADER.size, None  # pending: fragments of a FIRST..LAST record
    while pos + _HEADER.size <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER.size:  # block trailer: zero padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, rtype = _HEADER.unpack_from(data, pos)
        start, end = pos + _HEADER.size, pos + _HEADER.size + length
        if end > len(data):
            return  # truncated tail
        pos = end
        if rtype == 0 and length == 0:  # preallocated zeros
            continue
        chunk = data[start:end]
        if zlib.crc32(chunk, zlib.crc32(bytes([rtype]))) != crc:
            warnings.warn(f"{path}: bad checksum at byte {start - _HEADER.size}, record skipped",
                          UserWarning, stacklevel=2)
            pending = None
            continue
        if rtype == _FULL:
            payload = chunk
        elif rtype == _FIRST:
            pending = [chunk]
            continue
        elif rtype == _MIDDLE and pending is not None:
            pending.append(chunk)
            continue
        elif rtype == _LAST and pending is not None:
            payload, pending = b"".join([*pending, chunk]), None
        else:
            warnings.warn(f"{path}: unexpected fragment type {rtype}, skipped", UserWarning,
                          stacklevel=2)
            pending = None
            continue
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


# --------------------------------------------------------------------------- value helpers
def _item_path(item: Any) -> list[str]:
    """The key path of a config/summary/history item (``nested_key`` wins over ``key``)."""
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def _item_value(item: Any) -> Any:
    """The Python value of an item: ``value_json`` or, for typed history items, the typed field."""
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if kind is None:
        return None
    value = getattr(item, kind)
    if kind == "json":
        return json.loads(value)
    if kind == "none":
        return None
    return value


def _set_path(target: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        nxt = target.get(key)
        if not isinstance(nxt, dict):
            nxt = target[key] = {}
        target = nxt
    target[path[-1]] = value


def _del_path(target: dict[str, Any], path: Sequence[str]) -> None:
    for key in path[:-1]:
        target = target.get(key)  # type: ignore[assignment]
        if not isinstance(target, dict):
            return
    target.pop(path[-1], None)


def _unwrap_config(value: Any) -> Any:
    """Undo W&B's ``{"value": v, "desc": ...}`` wrappers (config.yaml style), recursively."""
    if isinstance(value, dict):
        if "value" in value and set(value) <= {"value", "desc"}:
            return _unwrap_config(value["value"])
        return {k: _unwrap_config(v) for k, v in value.items()}
    return value


def _find_tables(node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(logged key, path)`` for every ``table-file`` reference in a summary (nested) dict."""
    if isinstance(node, dict):
        if node.get("_type") in ("table-file", "partitioned-table", "joined-table") and isinstance(
            node.get("path"), str
        ):
            yield prefix, node["path"]
            return
        for key, value in node.items():
            yield from _find_tables(value, f"{prefix}/{key}" if prefix else str(key))


def _table_stem(path: Path) -> str:
    name = path.name
    for suffix in (".table.json", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# --------------------------------------------------------------------------- public API
def find_runs(wandb_dir: Path | str) -> list[Path]:
    """The ``offline-run-*`` folders under ``wandb_dir``, oldest first.

    ``wandb_dir`` may be the ``wandb/`` folder itself or its parent (``WANDB_DIR``).
    """
    wandb_dir = Path(wandb_dir)
    if (wandb_dir / "wandb").is_dir() and not list(wandb_dir.glob("offline-run-*")):
        wandb_dir = wandb_dir / "wandb"
    return sorted(p for p in wandb_dir.glob("offline-run-*") if p.is_dir())


def read_run(run_dir: Path | str) -> OfflineRun:
    """Read an offline run folder (``offline-run-<time>-<id>``) back into an :class:`OfflineRun`.

    Raises ``FileNotFoundError`` when the folder has no ``run-*.wandb`` file.
    """
    run_dir = Path(run_dir)
    wandb_files = sorted(run_dir.glob("run-*.wandb"))
    if not wandb_files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    run = OfflineRun(path=run_dir)
    files: set[str] = set()
    for record in iter_records(wandb_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.name, run.group, run.job_type = r.display_name, r.run_group, r.job_type
            run.notes, run.tags = r.notes, list(r.tags)
            _apply_updates(run.config, r.config.update, r.config.remove)
            _apply_updates(run.summary, r.summary.update, r.summary.remove)
        elif kind == "config":
            _apply_updates(run.config, record.config.update, record.config.remove)
        elif kind == "summary":
            _apply_updates(run.summary, record.summary.update, record.summary.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_path(row, _item_path(item), _item_value(item))
            if record.history.HasField("step"):
                row["_step"] = record.history.step.num
            row.setdefault("_step", len(run.history))
            run.history.append(row)
        elif kind == "files":
            files.update(f.path for f in record.files.files)
        elif kind == "exit":
            run.complete, run.exit_code = True, record.exit.exit_code

    for key in _INTERNAL_KEYS:
        run.config.pop(key, None)
        run.summary.pop(key, None)
    run.config = _unwrap_config(run.config)

    files_dir = run_dir / "files"
    if files_dir.is_dir():
        files.update(p.relative_to(files_dir).as_posix() for p in files_dir.rglob("*")
                     if p.is_file())
    run.files = sorted(files)
    run.tables = _read_tables(files_dir, [*run.history, run.summary])
    return run


def _apply_updates(target: dict[str, Any], updates: Any, removes: Any) -> None:
    for item in updates:
        _set_path(target, _item_path(item), _item_value(item))
    for item in removes:
        _del_path(target, _item_path(item))


def _read_tables(
    files_dir: Path, sources: Sequence[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Tables under ``files/media/table``: keyed by the logged key for the latest file logged
    under that key (``sources``: history rows then the summary, later ones win), else by file
    stem (``samples_3_<hash>`` for ``samples_3_<hash>.table.json``)."""
    table_dir = files_dir / "media" / "table"
    if not table_dir.is_dir():
        return {}
    latest = {key: rel for source in sources for key, rel in _find_tables(source)}
    by_path = {rel: key for key, rel in latest.items()}
    tables: dict[str, dict[str, Any]] = {}
    for path in sorted(table_dir.rglob("*.json")):
        rel = path.relative_to(files_dir).as_posix()
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            warnings.warn(f"skipping unreadable table {path}: {exc}", UserWarning, stacklevel=2)
            continue
        tables[by_path.get(rel, _table_stem(path))] = content
    return tables
