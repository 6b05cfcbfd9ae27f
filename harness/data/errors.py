"""Errors of the data layer: bad data fails with a message that says what is wrong and where.

:class:`DataError` is raised for problems with the *data* (a missing column, an empty split, a row
that cannot be parsed); invalid *configuration* values raise :class:`ConfigError`, whose message
names the field. Both live in :mod:`harness.util.errors` (re-exported here) and are :class:`ValueError`
subclasses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from harness.util.errors import ConfigError, DataError

__all__ = ["ConfigError", "DataError", "config_error", "require_columns", "require_nonempty"]


def config_error(prefix: str, field: str, value: Any, why: str) -> ConfigError:
    """A :class:`ConfigError` whose message names ``<prefix>.<field>``, its value and the rule."""
    return ConfigError(f"{prefix}.{field}={value!r}: {why}")


def require_columns(ds: Any, columns: Iterable[str], where: str) -> None:
    """Raise :class:`DataError` naming the first missing column and listing the columns present.

    ``ds`` is anything with ``column_names`` (a ``datasets.Dataset``); ``where`` names the data
    (e.g. ``"preference dataset 'train' split"``) for the message.
    """
    present = list(ds.column_names)
    for col in columns:
        if col not in present:
            raise DataError(f"{where}: missing column {col!r}; columns present: {present}")


def require_nonempty(ds: Any, split: str, where: str) -> None:
    """Raise :class:`DataError` naming ``split`` when ``ds`` has no rows."""
    if len(ds) == 0:
        raise DataError(f"{where}: split {split!r} is empty (0 examples)")
