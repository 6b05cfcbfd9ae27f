"""Atomic writes: readers (parallel sweep jobs, a crash) see the old content or the new, never half.

Files go to a uniquely named temporary sibling, are flushed and ``fsync``-ed, then renamed over the
destination with :func:`os.replace`. Folders (checkpoints, tokenizers, cached datasets) are built
in a temporary sibling folder and renamed into place by :func:`publish_dir`. Integrity: a folder's
:func:`manifest` (size and sha256 of every file) is written with it (:data:`MANIFEST`, or the
stage cache's ``stage.json``), and :func:`damage` says whether it still matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_bytes(path: Path | str, data: bytes, replace: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (creating the parent folder); returns the path.

    ``replace=False``: never replace an existing file: the finished temporary file is hard-linked
    to ``path``, which fails with :class:`FileExistsError` when ``path`` exists (also when another
    process wrote it in the meantime), leaving that file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and fails if path exists (another writer won)
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename
                if path.exists():
                    raise FileExistsError(f"{path} exists") from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: Path | str, text: str, encoding: str = "utf-8", replace: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`write_bytes`)."""
    return write_bytes(path, text.encode(encoding), replace=replace)


def write_json(path: Path | str, payload: Any) -> Path:
    """Write ``payload`` as indented, key-sorted JSON atomically (non-JSON values via ``str``)."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def publish_dir(dest: Path | str, build: Callable[[Path], None], replace: bool = True) -> Path:
    """Build a folder with ``build(tmp)`` in a temporary sibling of ``dest``, then rename it to ``dest``.

    ``replace=True``: an existing ``dest`` is replaced whole (renamed aside, deleted only once the
    new folder is in place, restored if the rename fails). ``replace=False``: when another process
    published ``dest`` first, its copy is kept and this one discarded.
    """
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        if not dest.exists():
            try:
                os.rename(tmp, dest)
                return dest
            except OSError:
                if replace or not dest.exists():
                    raise
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return dest
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return dest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    """Best effort: make the rename itself durable (not supported everywhere, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(path: Path | str, field: str) -> None:
    """Refuse a folder that cannot be created or written, before any work, naming its field.

    Creates ``path`` (and parents) if needed and writes then removes a probe file, so a read-only
    mount, a full quota or a file in the way is found at the start of a run, not after training.
    Raises :class:`harness.models.architecture.ConfigError` (a config error: no record is written).
    """
    from harness.util.errors import ConfigError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".harness-writable-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{field}={str(path)!r}: cannot write there "
                          f"({exc.strerror or type(exc).__name__}); choose another folder with "
                          f"{field}=...") from exc


CHUNK = 1 << 20
#: the manifest file a published folder of derived data (datasets, tokenizers) carries
MANIFEST = "manifest.json"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest(folder: Path) -> dict[str, list]:
    """``{relative path: [size in bytes, sha256]}`` of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, file_digest(p)]
            for p in sorted(folder.rglob("*")) if p.is_file()}


def damage(folder: Path, expected: dict[str, list]) -> str | None:
    """The first difference between ``folder`` and its manifest (sizes first: cheap), or None."""
    for rel, (size, _) in expected.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {size} when it was committed"
    for rel, (_, digest) in expected.items():
        if file_digest(folder / rel) != digest:
            return f"{rel} changed since it was committed (sha256 differs)"
    return None


def write_manifest(folder: Path) -> None:
    """Write ``folder``'s :func:`manifest` into it as :data:`MANIFEST` (call before publishing)."""
    files = {k: v for k, v in manifest(folder).items() if k != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(files, indent=1, sort_keys=True))


def folder_damage(folder: Path) -> str | None:
    """How ``folder`` differs from its :data:`MANIFEST` (None when it matches, or when it has none:
    a folder published before manifests existed cannot be checked); an unreadable manifest is
    damage too."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        expected = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"{MANIFEST} unreadable ({type(exc).__name__})"
    return damage(folder, expected)
