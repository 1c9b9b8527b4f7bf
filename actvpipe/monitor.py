"""Watching a loader: counters read from shared memory every ``refresh_interval``, written as
TensorBoard scalars and shown as a one-line dashboard on stderr.

The generators only bump counters in the shared buffer's header; the training process reads them
here, so monitoring never blocks or queues anything in the generators.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import psutil

TAGS = (
    "buffer/fill_fraction",
    "rate/generated_per_s",
    "rate/served_per_s",
    "rate/disk_per_s",
    "generator/device_is_gpu",
    "memory/rss_bytes",
    "loader/wait_s",
)


@dataclass(frozen=True)
class Snapshot:
    """What the loader looks like at ``time``: rows held of ``size``, cumulative counts, memory."""

    time: float
    held: int
    size: int
    generated: int  # rows written by live sources (a model), this pass
    disk: int  # rows written by HDF5 sources, this pass
    served: int  # rows served, all passes
    on_gpu: bool
    memory: int
    waited: float  # seconds the training loop waited for batches, all passes
    batches: int


def scalars(before: Snapshot, now: Snapshot) -> dict[str, float]:
    """The TensorBoard scalars for the interval between two snapshots of the same pass."""
    dt = max(now.time - before.time, 1e-9)
    batches = now.batches - before.batches
    return {
        "buffer/fill_fraction": now.held / now.size,
        "rate/generated_per_s": (now.generated - before.generated) / dt,
        "rate/served_per_s": (now.served - before.served) / dt,
        "rate/disk_per_s": (now.disk - before.disk) / dt,
        "generator/device_is_gpu": float(now.on_gpu),
        "memory/rss_bytes": float(now.memory),
        "loader/wait_s": (now.waited - before.waited) / batches if batches else 0.0,
    }


def dashboard_line(held: int, size: int, rate: float, on_gpu: bool, served: int) -> str:
    """``Buffer: 45,231/1,000,000 (4.5%) | Rate: 1,234/s | Device: cpu | Served: 2,000,000``."""
    device = "gpu" if on_gpu else "cpu"
    return (
        f"Buffer: {held:,}/{size:,} ({100 * held / size:.1f}%) | Rate: {rate:,.0f}/s "
        f"| Device: {device} | Served: {served:,}"
    )


def memory_of(pids: list[int]) -> int:
    """Resident bytes of these processes, shared pages split among their sharers (PSS), so the
    shared buffer counts once however many processes map it."""
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            info = psutil.Process(pid).memory_full_info()
            total += getattr(info, "pss", info.rss)
    return total


class Monitor:
    """Samples a running loader at most every ``refresh_interval`` seconds, for TensorBoard
    (``log_dir``) and the dashboard (``progress``; None: when stderr is a terminal)."""

    def __init__(self, log_dir: str | os.PathLike | None, progress: bool | None, refresh_interval: float):
        self.log_dir = log_dir
        self.disk_sources: tuple[bool, ...] = (False,)  # per buffer source: does it read HDF5 files
        self.show = sys.stderr.isatty() if progress is None else progress
        self.refresh_interval = refresh_interval
        self._writer = self._bar = self._stdout = self._proxy = None
        self._run = self._last = None
        self._served = self._batches = 0
        self._waited = 0.0

    @property
    def active(self) -> bool:
        return self.log_dir is not None or self.show

    def after_batch(self, run: Any, rows: int, waited: float) -> None:
        """Count a batch of ``rows`` that took ``waited`` seconds to arrive; refresh when due."""
        self._served += rows
        self._batches += 1
        self._waited += waited
        if run is not self._run:  # a new pass: its counters start from zero
            self._run, self._last = run, self._snapshot(run)
            return
        if time.monotonic() - self._last.time >= self.refresh_interval:
            self.refresh()

    def refresh(self) -> None:
        if self._run is None:
            return
        now = self._snapshot(self._run)
        values = scalars(self._last, now)
        if self.log_dir is not None:
            self._open_writer()
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, now.batches, walltime=time.time())
        if self.show:
            self._open_bar()
            rate = values["rate/generated_per_s"] + values["rate/disk_per_s"]
            line = dashboard_line(now.held, now.size, rate, now.on_gpu, now.served)
            self._bar.set_description_str(line, refresh=True)
        self._last = now

    def _snapshot(self, run: Any) -> Snapshot:
        buffer = run.buffer
        pids = [os.getpid(), *(p.pid for p in run.generators.processes if p.pid is not None)]
        written = [(buffer.get("written", k), self.disk_sources[k]) for k in range(buffer.n_sources)]
        return Snapshot(
            time=time.monotonic(),
            held=buffer.held(),
            size=buffer.size,
            generated=sum(n for n, disk in written if not disk),
            disk=sum(n for n, disk in written if disk),
            served=self._served,
            on_gpu=bool(buffer.get("on_gpu", 0)),
            memory=memory_of(pids),
            waited=self._waited,
            batches=self._batches,
        )

    def _open_writer(self) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.fspath(self.log_dir))

    def _open_bar(self) -> None:
        """The status line; while it shows, ``print`` goes through tqdm so it never splits the line."""
        if self._bar is None:
            from tqdm import tqdm
            from tqdm.contrib import DummyTqdmFile

            self._bar = tqdm(file=sys.stderr, bar_format="{desc}", dynamic_ncols=True)
            self._stdout = sys.stdout
            self._proxy = sys.stdout = DummyTqdmFile(sys.stdout)

    def end_pass(self) -> None:
        """Flush the last values, remove the status line and put stdout back (iteration ended)."""
        self.refresh()
        if self._bar is not None:
            if sys.stdout is self._proxy:
                sys.stdout = self._stdout
            self._bar.close()
            self._bar = self._proxy = None

    def close(self) -> None:
        """``end_pass``, then close the TensorBoard writer."""
        self.end_pass()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._run = None
