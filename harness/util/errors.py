"""The harness's two kinds of error, on the ground floor so that every layer may raise them:
:class:`ConfigError` (a configuration value is invalid; the message names the field) and
:class:`DataError` (the data is unusable; the message says what and where). Both stop a run before
any work with one line (``config error: ...`` / ``data error: ...``, exit status 1)."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class DataError(ValueError):
    """The data is unusable (missing column, empty split, unparseable row); the message says why."""
