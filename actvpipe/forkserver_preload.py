"""What the fork server imports once, so that a generator forked from it does not: the generator,
the live stream's pipeline and the model classes it loads. Imported last, it then marks the server
ready (``generator.ready_marker``): until then the trainer spawns generators instead of waiting."""

import atexit
import contextlib
import os

from transformers import (  # noqa: F401
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

import actvpipe.pipeline  # noqa: F401
from actvpipe.generator import ready_marker

SERVER = os.getpid()
open(ready_marker(SERVER), "w").close()


@atexit.register
def _unmark() -> None:
    if os.getpid() == SERVER:  # not in a generator forked from the server
        with contextlib.suppress(FileNotFoundError):
            os.remove(ready_marker(SERVER))
