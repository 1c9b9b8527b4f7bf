"""The generator process: runs a source's node graph and writes its rows into the shared buffer.

``GeneratorRun`` is the training side's handle on the processes of one run: started for a buffer,
stopped however the run ends (``close()``, an exception, garbage collection or interpreter exit).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.forkserver as forkserver
import os
import signal
import sys
import threading
import time
import traceback
import types
import weakref
from collections.abc import Callable, Iterator, Sequence

import psutil
import torch
from torchdata.nodes import Loader

from actvpipe.records import RowBlock
from actvpipe.resume import ResumePlan
from actvpipe.shm import SharedRowBuffer
from actvpipe.spec import Hdf5Spec, StreamSpec

Source = StreamSpec | Hdf5Spec
MAX_WAIT = 0.005  # seconds: the longest sleep of any poll, between two checks of the other side


class GeneratorError(RuntimeError):
    """The generator process failed; the message carries its traceback or exit signal."""


class _Stopped(Exception):
    """The training side asked the generator to stop, or went away."""


def write_block(
    buffer: SharedRowBuffer, block: RowBlock, next_block: tuple | None, should_stop: Callable, source: int = 0
) -> None:
    """Copy a block into the free slots the trainer hands this source as they come, pushing each
    piece to the source's FIFO; ``next_block`` (seq, record, offset), pushed with the last piece,
    says where the next block starts."""
    written, backoff = 0, 1e-4
    while True:
        slots = buffer.claim(len(block) - written, source)
        if len(slots) == 0 and written < len(block):
            if should_stop():
                raise _Stopped
            time.sleep(backoff)
            backoff = min(2 * backoff, MAX_WAIT)
            continue
        end = written + len(slots)
        buffer.write(slots, block, written, end, source)
        buffer.push(slots, next_block if end == len(block) else None, source)
        if end == len(block):
            return
        written, backoff = end, 1e-4


def generator_main(
    source: Source, plan: ResumePlan, buffer: SharedRowBuffer, parent_pid: int, index: int
) -> None:
    """Entry point of a generator process: fills the buffer as its source number ``index``. If the
    trainer dies, the generator removes the shared block's name (the trainer cannot) and exits."""
    trainer = psutil.Process(parent_pid)

    def should_stop() -> bool:
        if not _running(trainer):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(buffer.path)
            return True
        return buffer.stop_requested()

    # Ctrl-C reaches the whole process group: the training process handles it and stops this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _quiet_libraries()
        if isinstance(source, StreamSpec):
            torch.set_num_threads(source.threads or os.cpu_count() or 1)
            if source.deterministic:
                reproducible_blas()
        report = lambda on_gpu: buffer.set("on_gpu", int(on_gpu), index)  # noqa: E731
        for block in Loader(source.rows_graph(plan, buffer.fill_fraction, report)):
            if should_stop():
                return
            buffer.count_computed(block.computed, index)
            write_block(buffer, block, block.next_block, should_stop, index)
            del block  # nothing holds its staging tensor now: the next forward reuses it
        buffer.finish(index)
    except _Stopped:
        return
    except BaseException:
        buffer.fail(traceback.format_exc(), index)
        sys.exit(1)


MKL_CBWR_AUTO, MKL_CBWR_STRICT = 2, 0x10000  # mkl_cbwr.h


def reproducible_blas() -> bool:
    """Make MKL's GEMMs (every matmul of a CPU forward on x86) bitwise reproducible run to run.

    By default MKL may change how many threads a GEMM uses at run time (``MKL_VERBOSE`` shows
    ``Dyn:1``), and a GEMM's result depends on its thread count; Intel documents both as sources of
    run-to-run differences. This turns dynamic threads off and selects strict conditional numerical
    reproducibility, under which ``?gemm`` is bitwise reproducible whatever the thread count.
    Returns False where torch has no MKL (nothing to do).
    """
    if not torch.backends.mkl.is_available():
        return False
    library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    library.MKL_Set_Dynamic(ctypes.c_int(0))
    return library.mkl_serv_cbwr_set(ctypes.c_int(MKL_CBWR_AUTO | MKL_CBWR_STRICT)) == 0


def _running(process: psutil.Process) -> bool:
    """False once the process has exited, even while it is a zombie its parent has not reaped (our
    parent is the fork server, so no change of parent tells us)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _context() -> mp.context.BaseContext:
    """Fork generators from a fork server once one runs; spawn them until then.

    The server imports torch, transformers and actvpipe once, so a generator forked from it starts
    in milliseconds. It is launched on first use without waiting for those imports (they run in the
    server, in parallel with the first generator, which is spawned), so no ``start()`` waits for
    them; a later start waits only if the server is still importing.
    """
    if forkserver._forkserver._forkserver_pid is not None:  # private, but the stdlib has no query
        return mp.get_context("forkserver")
    forkserver.set_forkserver_preload(["actvpipe.generator"])
    forkserver.ensure_running()
    return mp.get_context("spawn")


def _quiet_libraries() -> None:
    """No progress bars from the libraries, and no named semaphore from tqdm: in a process started
    by spawn or the fork server, tqdm's default lock is a multiprocessing lock, a file in /dev/shm
    that a killed generator would leave until the trainer exits (``datasets`` takes it on load)."""
    import tqdm
    import transformers

    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is imported, if it is
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
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
    """One process per source, writing into ``buffer`` per its plan."""

    def __init__(self, sources: Sequence[Source], buffer: SharedRowBuffer, plans: Sequence[ResumePlan]):
        ctx = _context()
        self.buffer = buffer
        self.processes = []
        for index, (source, plan) in enumerate(zip(sources, plans, strict=True)):
            args = (source, plan, buffer, os.getpid(), index)
            name = f"actvpipe-generator-{index}"
            self.processes.append(ctx.Process(target=generator_main, args=args, name=name, daemon=True))
        self._finalizer = weakref.finalize(self, _shutdown, buffer, self.processes)
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


def _shutdown(buffer: SharedRowBuffer, processes: list[mp.Process]) -> None:
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
    buffer.unlink()
