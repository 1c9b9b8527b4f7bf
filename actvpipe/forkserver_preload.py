"""What every generator needs, imported once by the fork server so that a generator forked from it
does not: the generator, the file reader and the live pipeline's own modules (transformers is
preloaded only for live runs: ``generator.LIVE_PRELOAD``). Imported last, it then marks the server
ready (``generator.ready_marker``): until then the trainer spawns generators instead of waiting."""

import atexit
import contextlib
import os

import actvpipe.hdf5
import actvpipe.pipeline  # noqa: F401
from actvpipe.generator import ready_marker

SERVER = os.getpid()
open(ready_marker(SERVER), "w").close()


@atexit.register
def _unmark() -> None:
    if os.getpid() == SERVER:  # not in a generator forked from the server
        with contextlib.suppress(FileNotFoundError):
            os.remove(ready_marker(SERVER))
