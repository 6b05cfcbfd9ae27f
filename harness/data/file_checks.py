"""Checks of local data files before ``datasets`` parses them, so bad bytes are named by line.

``datasets.load_dataset("json", ...)`` reports a malformed line as a generic
``DatasetGenerationError`` and non-UTF-8 bytes as a bare ``UnicodeDecodeError``, naming neither the
file nor the line. :func:`check_local_file` finds both first and raises
:class:`harness.data.errors.DataError` with the file, the line and the column.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.data.errors import DataError

#: builders whose files are text that must be UTF-8
TEXT_BUILDERS = ("json", "csv", "text")


def _line_col(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column of byte ``offset`` in ``data``."""
    line = data.count(b"\n", 0, offset) + 1
    return line, offset - (data.rfind(b"\n", 0, offset) + 1) + 1


def check_local_file(path: Path, builder: str, where: str) -> None:
    """Raise :class:`DataError` for a text file that is not UTF-8 or (``json``) not valid JSON.

    A ``json`` file may hold one JSON document or JSON Lines (one object per line); for JSON Lines
    the first line that does not parse is reported with its column.
    """
    if builder not in TEXT_BUILDERS or not path.is_file():
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _line_col(data, exc.start)
        raise DataError(f"{where}: file {str(path)!r}, line {line}, column {col}: not UTF-8 "
                        f"(byte 0x{data[exc.start]:02x}: {exc.reason}); save the file as UTF-8"
                        ) from exc
    if builder != "json":
        return
    try:
        json.loads(text)
        return  # one JSON document
    except json.JSONDecodeError:
        pass
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: file {str(path)!r}, line {i}, column {exc.colno}: "
                            f"malformed JSON ({exc.msg})") from exc
