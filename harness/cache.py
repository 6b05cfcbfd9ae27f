"""The stage cache: a stage's output is stored under a key hashed from exactly the config that decides it.

Every method of a sweep therefore starts from the same SFT base (and reward model): the first job
trains it, the others find it. A file lock serialises jobs that need the same stage at once.

What the cache guarantees: a stage counts as cached only once ``stage.json`` is written, last and
atomically, after its checkpoint; ``stage.json`` lists every checkpoint file with its size and
sha256, and a stage whose files no longer match (truncated, edited, missing) is reported with its
key and path and trained again instead of being loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.util.atomic import damage, manifest, write_json

log = logging.getLogger("harness")


def stage_key(kind: str, decides: dict[str, Any]) -> str:
    """``<kind>-<16 hex>``: sha256 of the canonical JSON of the config parts that decide the stage."""
    blob = json.dumps({"stage": kind, **decides}, sort_keys=True, separators=(",", ":"), default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


@dataclass
class StageRecord:
    """What a finished stage leaves: where its checkpoint is, its metrics, what decided it."""

    key: str
    path: Path
    cached: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    decides: dict[str, Any] = field(default_factory=dict)
    #: A fresh id each time the stage is trained: stages built on it (the reward model on the SFT
    #: base) put it in their key, so retraining a base (``force_retrain``) never pairs the new
    #: base with a stale dependent stage. Empty for records written before it existed.
    trained_id: str = ""

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "path": str(self.path), "checkpoint": str(self.checkpoint),
                "cached": self.cached, "metrics": self.metrics}


class StageCache:
    """Folders ``<root>/stages/<key>/`` holding ``checkpoint/`` and ``stage.json`` (written last)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "stages").mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / "stages" / key

    def load(self, key: str) -> StageRecord | None:
        """The finished stage under ``key``, or None if it was never completed or is damaged.

        A damaged stage (its checkpoint no longer matches the manifest in ``stage.json``, or
        ``stage.json`` itself is unreadable) is logged with its key and path and un-committed, so
        the caller trains it again.
        """
        meta = self.path(key) / "stage.json"
        if not meta.is_file():
            return None
        try:
            data = json.loads(meta.read_text())
            problem = damage(self.path(key) / "checkpoint", data.get("files", {}))
        except (OSError, ValueError) as exc:
            problem = f"stage.json is unreadable ({exc})"
        if problem is not None:
            log.warning("cached stage %s at %s is damaged: %s; training it again",
                        key, self.path(key), problem)
            self.uncommit(key)
            return None
        return StageRecord(key=key, path=self.path(key), cached=True,
                           metrics=data.get("metrics", {}), decides=data.get("decides", {}),
                           trained_id=data.get("trained_id", ""))

    def uncommit(self, key: str) -> None:
        """Forget a stage (its ``stage.json``), so the next run trains it again."""
        (self.path(key) / "stage.json").unlink(missing_ok=True)

    def commit(self, record: StageRecord) -> None:
        """Mark the stage complete by writing ``stage.json`` atomically (rank 0 only)."""
        from harness.util.distributed import is_rank_zero

        if not is_rank_zero():
            return
        payload = {"key": record.key, "metrics": record.metrics, "decides": record.decides,
                   "trained_id": record.trained_id, "files": manifest(record.checkpoint)}
        write_json(self.path(record.key) / "stage.json", payload)

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive lock on a stage, so parallel sweep jobs train it once and share it.

        Only rank 0 of a DDP run locks: the other ranks train the same stage in the same
        collective and would otherwise wait for a lock that rank 0 holds while waiting for them.
        """
        from harness.util.distributed import is_rank_zero

        if not is_rank_zero():
            yield
            return
        lock_path = self.root / "stages" / f"{key}.lock"
        # read-write without truncating: the holder's line (pid, host, since when) stays readable
        with open(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644), "r+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = fh.read().strip() or "another process"
                log.info("stage %s: waiting for its lock, held by %s (another run trains it; "
                         "this run will reuse it)", key, holder)
                t0 = time.monotonic()
                fcntl.flock(fh, fcntl.LOCK_EX)
                log.info("stage %s: lock acquired after %.0f s", key, time.monotonic() - t0)
            try:
                fh.seek(0)
                fh.truncate()
                fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                fh.flush()
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
