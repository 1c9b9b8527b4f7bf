"""The one owner of a loader's pass lifecycle: the generator processes and the shared block of each
pass, started fresh or for the rest of a saved pass, and closed however the loader ends."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actvpipe.loader_state import BufferState
from actvpipe.mixing import Mixing
from actvpipe.pass_run import PassRun
from actvpipe.resume import ResumePlan
from actvpipe.spec import GeneratorOptions, RowSource


class Passes:
    """Starts each pass's ``PassRun``; at most one runs at a time."""

    def __init__(
        self, sources: Sequence[RowSource], options: GeneratorOptions, mixing: Mixing, progress_timeout: float
    ):
        self.sources, self.options, self.mixing = list(sources), options, mixing
        self.progress_timeout = progress_timeout
        self.run: PassRun | None = None
        self.started_for: dict[str, Any] | None = None  # the saved sampler state the run restores
        self.pass_number = 0  # of the run: counted when a fresh pass starts, else the saved one's

    def start(self, saved: dict[str, Any] | None = None) -> PassRun:
        """The run for a new pass (``saved`` None) or for the rest of the saved one. A run started for
        the same (or no) state that nothing has drawn from yet is kept, so ``start()`` followed by
        iteration uses the generators already started."""
        if self.run is not None and not self.run.used and saved is self.started_for:
            return self.run
        self.close()
        n = len(self.sources)
        if saved is None:
            self.pass_number += 1
            plans = [ResumePlan.fresh() for _ in self.sources]
            self.run = PassRun(
                self.sources, self.options, self.mixing, plans, [0] * n, [0] * n,
                progress_timeout=self.progress_timeout,
            )  # fmt: skip
        else:
            state = BufferState.from_dict(saved)
            self.pass_number = state.pass_number
            plans, order = state.plans()
            self.run = PassRun(
                self.sources, self.options, self.mixing, plans, state.frontiers, state.published,
                state.batches, order, state.buffered_tokens, state.published_indices(),
                progress_timeout=self.progress_timeout,
            )  # fmt: skip
        self.started_for = saved
        return self.run

    def close(self) -> None:
        if self.run is not None:
            self.run.close()
            self.run = None
