"""Where the Hydra configs are: the repository's ``conf/`` or the copy shipped inside the package."""

from __future__ import annotations

from pathlib import Path

#: the ``harness`` package folder (this module is ``harness/util/conf_path.py``)
_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def config_dir() -> Path:
    """The directory holding ``config.yaml`` and the config groups (``model/``, ``method/``, ...).

    The top-level ``conf/`` of the repository is the one source of truth; nothing is committed
    inside ``harness/``. A wheel (``pip install .``) ships a copy of it as ``harness/conf``
    (``pyproject.toml`` maps the package ``harness.conf`` to ``conf/``), because an installed
    package has no repository next to it: a fixed ``config_path="../conf"`` would then point at
    ``<site-packages>/conf``, which does not exist, and Hydra could not compose a config.

    So: the packaged copy ``<package>/conf`` when it exists (a regular install), else the
    repository's ``<package parent>/conf`` (a source checkout or an editable install, where
    ``harness/`` is the repository's own folder and has no ``conf/`` inside).

    Raises:
        FileNotFoundError: if neither place has a ``config.yaml``; the message names both.
    """
    packaged = _PACKAGE_DIR / "conf"
    source = _PACKAGE_DIR.parent / "conf"
    for candidate in (packaged, source):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"harness: no Hydra config directory found; looked for config.yaml in {packaged} "
        f"(the copy shipped in an installed package) and in {source} (the repository's conf/ "
        f"in a source checkout or editable install)"
    )
