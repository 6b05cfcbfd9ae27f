"""Whether an online W&B run can authenticate, decided before any work (no network, no wandb import).

W&B finds its key in ``WANDB_API_KEY`` or in the netrc entry that ``wandb login`` writes for the
API host (``WANDB_BASE_URL``, default ``https://api.wandb.ai``; the netrc file is ``NETRC`` or
``~/.netrc``). Without either, ``wandb.init`` fails only when the logger starts — after the
stages before it have trained — so the harness checks here, while validating the config.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

OFFLINE_MODES = ("offline", "dryrun", "disabled")


def wants_online(offline_cfg: bool) -> bool:
    """Whether the W&B logger will try to reach the server (``logger.offline`` and ``WANDB_MODE``)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "online":
        return True
    return not offline_cfg and mode not in OFFLINE_MODES


def credentials_found() -> bool:
    """True when ``WANDB_API_KEY`` is set or the netrc file holds a password for the API host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])
