"""The generator process: runs a source's node graph and writes its rows into the shared buffer.

``GeneratorRun`` is the training side's handle on the processes of one run: started for a buffer,
stopped however the run ends (``close()``, an exception, garbage collection or interpreter exit).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.forkserver as forkserver
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
import weakref
from collections.abc import Callable, Iterator, Sequence

import psutil
from torchdata.nodes import Loader

from actvpipe.records import RowBlock
from actvpipe.resume import ResumePlan
from actvpipe.shm import GeneratorView, SharedBlock, TrainerView
from actvpipe.spec import GeneratorOptions, RowSource

MAX_WAIT = 0.005  # seconds: the longest sleep of any poll, between two checks of the other side


class GeneratorError(RuntimeError):
    """The generator process failed; the message carries its traceback or exit signal."""


class _Stopped(Exception):
    """The training side asked the generator to stop, or went away."""


def write_block(
    buffer: GeneratorView, block: RowBlock, next_block: tuple | None, should_stop: Callable
) -> None:
    """Copy a block into the free slots the trainer hands this source as they come, pushing each
    piece to the source's FIFO; ``next_block`` (seq, record, offset), pushed with the last piece,
    says where the next block starts."""
    written, backoff = 0, 1e-4
    while True:
        slots = buffer.claim(len(block) - written)
        if len(slots) == 0 and written < len(block):
            if should_stop():
                raise _Stopped
            with buffer.waiting_for_slots():
                time.sleep(backoff)
            backoff = min(2 * backoff, MAX_WAIT)
            continue
        end = written + len(slots)
        buffer.write(slots, block, written, end)
        buffer.push(slots, next_block if end == len(block) else None)
        if end == len(block):
            return
        written, backoff = end, 1e-4


def generator_main(
    source: RowSource,
    options: GeneratorOptions,
    plan: ResumePlan,
    shared: SharedBlock,
    parent_pid: int,
    index: int,
    pause: float = 0.0,
) -> None:
    """Entry point of a generator process: fills the buffer as its source number ``index``. If the
    trainer dies, the generator removes the shared block's name (the trainer cannot) and exits."""
    trainer = psutil.Process(parent_pid)
    buffer = GeneratorView(shared, index, pause)

    def should_stop() -> bool:
        if not _running(trainer):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shared.path)
            return True
        return buffer.stop_requested()

    # Ctrl-C reaches the whole process group: the training process handles it and stops this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _quiet_libraries()
        source.setup_process()
        graph = source.rows_graph(plan, options, buffer.fill_fraction, buffer.report_device)
        for rows in Loader(graph):
            if should_stop():
                return
            buffer.count_computed(rows.computed)
            write_block(buffer, rows, rows.next_block, should_stop)
            del rows  # nothing holds its staging tensor now: the next forward reuses it
        buffer.finish()
    except _Stopped:
        return
    except BaseException:
        buffer.fail(traceback.format_exc())
        sys.exit(1)


def _running(process: psutil.Process) -> bool:
    """False once the process has exited, even while it is a zombie its parent has not reaped (our
    parent is the fork server, so no change of parent tells us)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# What a live stream's generator imports beyond every generator's needs (``forkserver_preload``):
# the fork server preloads them only when a live stream launches it.
LIVE_PRELOAD = ("transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto")


def _context(live: bool) -> mp.context.BaseContext:
    """Fork generators from a fork server once it is ready; spawn them until then.

    The server imports once what every generator needs (``forkserver_preload``), and, when a run
    with a live source launches it, transformers' model and tokenizer classes, so a generator forked
    from it starts in milliseconds. A run reading only files never loads transformers anywhere (a
    live run forking later from such a server imports it in its generator). The server is launched
    on first use without waiting for those imports, and a generator is spawned (started at once,
    importing in parallel) until the server says it is ready, so no ``start()`` waits for them.
    """
    pid = forkserver_pid()
    if pid is not None:
        return mp.get_context("forkserver" if os.path.exists(ready_marker(pid)) else "spawn")
    forkserver.set_forkserver_preload([*(LIVE_PRELOAD if live else ()), "actvpipe.forkserver_preload"])
    forkserver.ensure_running()
    return mp.get_context("spawn")


def ready_marker(server_pid: int) -> str:
    """The file a fork server creates once its imports are done (see ``forkserver_preload``)."""
    return os.path.join(tempfile.gettempdir(), f"actvpipe-forkserver-{server_pid}.ready")


def forkserver_pid() -> int | None:
    """The pid of this process's fork server, if it started one. The stdlib has no public query, so
    this reads ``multiprocessing.forkserver``'s private state, here only (a test fails loudly if a
    Python release removes it)."""
    return forkserver._forkserver._forkserver_pid


def _quiet_libraries() -> None:
    """No progress bars from ``datasets``, and no named semaphore from tqdm: in a process started
    by spawn or the fork server, tqdm's default lock is a multiprocessing lock, a file in /dev/shm
    that a killed generator would leave until the trainer exits (``datasets`` takes it on load).
    A live source quiets transformers itself (``StreamSpec.setup_process``)."""
    import tqdm

    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is imported, if it is
    tqdm.tqdm.set_lock(threading.RLock())


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start the child without re-importing the user's ``__main__`` (a spawned or fork-server child
    would otherwise rerun the script)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


PROCESS_CHECK_INTERVAL = 0.05  # seconds between asking the OS whether the generators live
STOP_GRACE = 0.02  # seconds a generator gets to stop by itself on close() before it is killed
PAUSE_VARIABLE = "ACTVPIPE_TEST_PAUSE"  # tests: seconds each generator-side buffer operation pauses


class GeneratorRun:
    """One process per source, writing into the shared buffer per its plan."""

    def __init__(
        self,
        sources: Sequence[RowSource],
        options: GeneratorOptions,
        buffer: TrainerView,
        plans: Sequence[ResumePlan],
    ):
        ctx = _context(live=any(not source.from_disk for source in sources))
        self.buffer, block = buffer, buffer.block
        pause = float(os.environ.get(PAUSE_VARIABLE, 0))
        self.processes = []
        for index, (source, plan) in enumerate(zip(sources, plans, strict=True)):
            args = (source, options, plan, block, os.getpid(), index, pause)
            name = f"actvpipe-generator-{index}"
            self.processes.append(ctx.Process(target=generator_main, args=args, name=name, daemon=True))
        self._finalizer = weakref.finalize(self, _shutdown, self.buffer, block, self.processes)
        with _main_module_hidden():
            for process in self.processes:
                process.start()
        self._next_process_check = 0.0

    @property
    def process(self) -> mp.Process:
        """The first source's generator process."""
        return self.processes[0]

    def check_alive(self) -> None:
        """Raise ``GeneratorError`` if a generator failed or died before finishing its pass.

        Called per batch and in every wait: the error flags are shared-memory reads; asking the OS
        whether the processes live costs more (~13 µs with a fork server), so that runs at most every
        50 ms.
        """
        text = self.buffer.error_text()
        if text is not None:
            raise GeneratorError(f"the actvpipe generator process failed:\n{text}")
        now = time.monotonic()
        if now < self._next_process_check:
            return
        self._next_process_check = now + PROCESS_CHECK_INTERVAL
        for index, process in enumerate(self.processes):
            if not process.is_alive() and not self.buffer.done(index):
                code = process.exitcode
                how = (
                    f"signal {signal.Signals(-code).name}"
                    if code is not None and code < 0
                    else f"exit code {code}"
                )
                doing = self.buffer.operation(index)
                raise GeneratorError(
                    f"the actvpipe generator process died ({how}, while {doing}) before finishing its pass"
                )

    def close(self) -> None:
        self._finalizer()


def _shutdown(buffer: TrainerView, block: SharedBlock, processes: list[mp.Process]) -> None:
    """Ask the generators to stop, kill any still running after ``STOP_GRACE`` (their rows are being
    discarded, and they hold nothing the trainer needs), then remove the shared block."""
    buffer.request_stop()
    deadline = time.monotonic() + STOP_GRACE
    for process in processes:
        if process.pid is not None:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
    block.unlink()
