"""Where actvpipe keeps files of its own: the demo model and memory-mapped copies of in-memory data."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cache_dir() -> Path:
    """``$ACTVPIPE_CACHE``, or ``~/.cache/actvpipe``."""
    return Path(os.environ.get("ACTVPIPE_CACHE", Path.home() / ".cache" / "actvpipe"))


def partial_path(target: Path) -> Path:
    """Where this process writes ``target`` before renaming it into place."""
    return target.with_name(f"{target.name}.{os.getpid()}.partial")


def remove_dead_partials(directory: Path) -> list[Path]:
    """Remove what ``partial_path`` left in ``directory`` for processes that no longer run (killed
    while writing); returns what it removed."""
    removed = []
    for path in directory.glob("*.partial") if directory.is_dir() else ():
        pid = path.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _running(int(pid)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
