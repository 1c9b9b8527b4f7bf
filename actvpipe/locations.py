"""Where actvpipe keeps files of its own: the demo model and memory-mapped copies of in-memory data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$ACTVPIPE_CACHE``, or ``~/.cache/actvpipe``."""
    return Path(os.environ.get("ACTVPIPE_CACHE", Path.home() / ".cache" / "actvpipe"))
