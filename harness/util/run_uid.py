"""A short random id per command, so that run directories and record ids never collide.

Hydra names run and sweep directories after the clock (``${now:%H-%M-%S}``), and two commands
started in the same second would share one folder and one results record. ``conf/config.yaml``
adds ``${run_uid:}``: six hex digits drawn once per command by :func:`harness.__main__.entry` and
kept in the environment variable ``HARNESS_RUN_UID``, so every job of one multirun (also in the
worker processes of a launcher such as joblib, which inherit the environment) resolves the same
sweep directory, while another command gets another id.
"""

from __future__ import annotations

import os
import secrets

ENV = "HARNESS_RUN_UID"


def new_run_uid() -> str:
    """Draw a fresh id for this command (and the processes it starts) and return it."""
    os.environ[ENV] = secrets.token_hex(3)
    return os.environ[ENV]


def run_uid() -> str:
    """This command's id (``${run_uid:}`` in the config): drawn on first use if none is set."""
    return os.environ.get(ENV) or new_run_uid()
