"""The generator process: builds the node graph text -> contexts -> rows and writes rows into the buffer.

``GeneratorRun`` is the training side's handle on one pass: the shared buffer plus the process, both
cleaned up however the run ends (``close()``, an exception, garbage collection or interpreter exit).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.forkserver as forkserver
import os
import signal
import sys
import time
import traceback
import types
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import psutil
import torch
from torchdata.nodes import BaseNode, Loader, Prefetcher

from actvpipe.capture import ActivationCapture, CaptureNode, RowBlock
from actvpipe.models import load_model, load_tokenizer
from actvpipe.placement import Placement
from actvpipe.resume import PlannedContexts, ResumePlan, RowFilter
from actvpipe.shm import SharedRowBuffer
from actvpipe.spec import Hdf5Spec, StreamSpec
from actvpipe.text import DocumentBlocks, PackedContexts, ShardedContexts

Source = StreamSpec | Hdf5Spec


class GeneratorError(RuntimeError):
    """The generator process failed; the message carries its traceback or exit signal."""


class _Stopped(Exception):
    """The training side asked the generator to stop, or went away."""


def build_rows_graph(
    spec: StreamSpec,
    plan: ResumePlan,
    fill: Callable[[], float] | None = None,
    report: Callable[[bool], None] | None = None,
) -> BaseNode[RowBlock]:
    """Load model and tokenizer, then: documents -> packed contexts per the plan (tokenized in a
    background thread) -> captured rows (on the device ``Placement`` picks) -> plan filter."""
    torch.set_num_threads(spec.threads or os.cpu_count() or 1)
    model = load_model(spec.model, spec.compute_dtype, "cpu")
    placement = Placement(model, spec.device, spec.watermarks, fill, report)
    tokenizer = load_tokenizer(spec.model.tokenizer)
    packer = PackedContexts(
        DocumentBlocks(spec.dataset), tokenizer, spec.context_length, spec.generation_batch_size, spec.packing
    )
    contexts = PlannedContexts(packer, plan)
    if spec.world_size > 1:
        contexts = ShardedContexts(contexts, spec.rank, spec.world_size, spec.generation_batch_size)
    contexts = Prefetcher(contexts, prefetch_factor=4)
    capture = ActivationCapture(model, spec.layers, spec.first_pos, spec.capture, spec.modules)
    rows = CaptureNode(contexts, capture, spec.dtype, placement, spec.exclude_tokens)
    return RowFilter(rows, plan)


def write_block(
    buffer: SharedRowBuffer, block: RowBlock, next_block: tuple | None, should_stop: Callable, source: int = 0
) -> None:
    """Copy a block into free slots as they become available, pushing each piece to the source's FIFO.

    At most ``cap`` of the source's rows wait unpublished, so one fast source cannot take every free
    slot from another. ``next_block`` (seq, record, offset), pushed with the last piece, says where
    the next block starts.
    """
    written, backoff = 0, 1e-4
    while True:
        room = buffer.get("cap", source) - buffer.pending(source)
        slots = buffer.claim(min(len(block) - written, max(room, 0)))
        if len(slots) == 0 and written < len(block):
            if should_stop():
                raise _Stopped
            time.sleep(backoff)
            backoff = min(2 * backoff, 0.005)
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
    """Entry point of a generator process: fills the buffer as its source number ``index``."""

    trainer = psutil.Process(parent_pid)

    def should_stop() -> bool:
        return buffer.stop_requested() or not _running(trainer)

    # Ctrl-C reaches the whole process group: the training process handles it and stops this one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _quiet_libraries()
        fill = lambda: 1.0 - buffer.get("n_free") / buffer.size  # noqa: E731
        report = lambda on_gpu: buffer.set_field("on_gpu", int(on_gpu), index)  # noqa: E731
        for block in Loader(source.rows_graph(plan, fill, report)):
            if should_stop():
                return
            buffer.count_computed(block.computed, index)
            write_block(buffer, block, block.next_block, should_stop, index)
        buffer.finish(index)
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
    import transformers

    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is imported, if it is
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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


class GeneratorRun:
    """One pass (or its remainder, per the plans): a fresh shared buffer and one process per source."""

    def __init__(
        self, sources: Sequence[Source], size: int, plans: Sequence[ResumePlan], caps: Sequence[int]
    ):
        ctx = _context()
        dtype, row_shape = sources[0].dtype, sources[0].row_shape
        self.buffer = SharedRowBuffer.create(size, row_shape, dtype, ctx.Lock(), n_sources=len(sources))
        self.processes = []
        for index, (source, plan, cap) in enumerate(zip(sources, plans, caps, strict=True)):
            self.buffer.set_cap(index, cap)
            # Where the source starts, for a state saved before it writes anything.
            start = tuple(int(v) for v in plan.blocks[-1])
            self.buffer.push(np.zeros(0, dtype=np.int64), next_block=start, source=index)
            args = (source, plan, self.buffer, os.getpid(), index)
            name = f"actvpipe-generator-{index}"
            self.processes.append(ctx.Process(target=generator_main, args=args, name=name, daemon=True))
        self._finalizer = weakref.finalize(self, _shutdown, self.buffer, self.processes)
        with _main_module_hidden():
            for process in self.processes:
                process.start()
        self.used = False
        self._next_process_check = 0.0

    @property
    def process(self) -> mp.Process:
        """The first source's generator process."""
        return self.processes[0]

    def check_alive(self) -> None:
        """Raise ``GeneratorError`` if a generator failed or died before finishing its pass.

        Called per batch: the error flag is one shared-memory read; asking the OS whether the
        processes live costs more (~13 µs with a fork server), so that runs at most every 50 ms.
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
                raise GeneratorError(f"the actvpipe generator process died ({how}) before finishing its pass")

    def close(self) -> None:
        self._finalizer()


def _shutdown(buffer: SharedRowBuffer, processes: list[mp.Process]) -> None:
    buffer.request_stop()
    for process in processes:
        if process.pid is not None:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
    buffer.unlink()
