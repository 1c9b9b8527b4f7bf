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

from actvpipe.status_line import StatusLine, is_terminal

TAGS = (
    "buffer/fill_fraction",
    "rate/generated_per_s",
    "rate/served_per_s",
    "rate/disk_per_s",
    "generator/device_is_gpu",
    "memory/rss_bytes",
    "loader/wait_s",
)
WATERMARK_TAGS = ("buffer/low_watermark", "buffer/high_watermark")  # live streams: the device policy's
# TensorBoard's custom-scalars page: the rates on one chart, the fill against the watermarks on another.
LAYOUT = {
    "actvpipe": {
        "throughput (rows/s)": [
            "Multiline",
            ["rate/generated_per_s", "rate/served_per_s", "rate/disk_per_s"],
        ],
        "buffer (fraction full)": ["Multiline", ["buffer/fill_fraction", *WATERMARK_TAGS]],
    }
}


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
    done: bool = False  # every source has finished its pass


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


PLAIN_INTERVAL = 30.0  # seconds between dashboard lines written to a stream that is no terminal
FULL = 0.99  # the fill at which a generator with nothing to write is waiting for room


def dashboard_line(before: Snapshot, now: Snapshot) -> str:
    """``Buffer: 45,231/1,000,000 (4.5%) | Rate: 1,234/s | Served: 5,000/s (2,000,000) | Device: cpu``.

    A zero rate says why: ``paused (buffer full)``, ``done`` (every source finished its pass) or
    ``waiting for data`` (the generator is starting, or reading or computing its next block)."""
    values = scalars(before, now)
    rate = values["rate/generated_per_s"] + values["rate/disk_per_s"]
    if rate >= 0.5:
        shown = f"{rate:,.0f}/s"
    elif now.done:
        shown = "done"
    elif now.held >= FULL * now.size:
        shown = "paused (buffer full)"
    else:
        shown = "waiting for data"
    served = f"{values['rate/served_per_s']:,.0f}/s ({now.served:,})"
    return (
        f"Buffer: {now.held:,}/{now.size:,} ({100 * now.held / now.size:.1f}%) | Rate: {shown} "
        f"| Served: {served} | Device: {'gpu' if now.on_gpu else 'cpu'}"
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

    def __init__(
        self,
        log_dir: str | os.PathLike | None,
        progress: bool | None,
        refresh_interval: float,
        disk_sources: tuple[bool, ...] = (False,),
        watermarks: tuple[float, float] | None = None,
    ):
        """``disk_sources``: per buffer source, whether it reads HDF5 files; ``watermarks``: the live
        stream's device policy, if any."""
        self.log_dir = log_dir
        self.disk_sources, self.watermarks = disk_sources, watermarks
        self.show = sys.stderr.isatty() if progress is None else progress
        self.refresh_interval = refresh_interval
        self._writer = self._line = None
        self._plain_at = float("-inf")
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

    @property
    def line(self) -> str:
        """The dashboard line as last drawn (empty before the first refresh)."""
        return self._line.text if self._line is not None else ""

    def refresh(self) -> None:
        if self._run is None:
            return
        now = self._snapshot(self._run)
        values = scalars(self._last, now)
        if self.log_dir is not None:
            self._open_writer()
            if self.watermarks is not None:
                values.update(zip(WATERMARK_TAGS, self.watermarks, strict=True))
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, now.batches, walltime=time.time())
        if self.show:
            text = dashboard_line(self._last, now)
            if self._line is not None or is_terminal(sys.stderr):
                if self._line is None:
                    self._line = StatusLine().open()
                self._line.update(text)
            elif now.time - self._plain_at >= PLAIN_INTERVAL:  # a log file: plain lines, now and then
                print(text, file=sys.stderr, flush=True)
                self._plain_at = now.time
        self._last = now

    def _snapshot(self, run: Any) -> Snapshot:
        """One ``RunSnapshot`` of the run (its shared header and processes), with this loop's counts."""
        seen = run.snapshot()
        header = seen.header
        written = list(zip(header.per_source("written"), self.disk_sources, strict=True))
        return Snapshot(
            time=time.monotonic(),
            held=header.held,
            size=header.size,
            generated=sum(n for n, disk in written if not disk),
            disk=sum(n for n, disk in written if disk),
            served=self._served,
            on_gpu=bool(header.per_source("on_gpu")[0]),
            memory=memory_of([os.getpid(), *seen.generator_pids]),
            waited=self._waited,
            batches=self._batches,
            done=header.done,
        )

    def _open_writer(self) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.fspath(self.log_dir))
            self._writer.add_custom_scalars(LAYOUT)

    def end_pass(self) -> None:
        """Flush the last values, erase the status line and give the streams back (iteration ended)."""
        self.refresh()
        if self._line is not None:
            self._line.close()
            self._line = None

    def close(self) -> None:
        """``end_pass``, then close the TensorBoard writer."""
        self.end_pass()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._run = None
