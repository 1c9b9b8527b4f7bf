"""A stream's pass run in this process, in generation order, and the two jobs built on it: writing
an HDF5 cache (``to_hdf5``) and computing normalisation statistics."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torchdata.nodes import Loader
from tqdm import tqdm

from actvpipe.hdf5 import from_storage, storage_dtype
from actvpipe.hdf5_writer import Hdf5RowWriter
from actvpipe.records import RowBlock
from actvpipe.resume import ResumePlan
from actvpipe.spec import GeneratorOptions, RowSource, StreamSpec
from actvpipe.stats import ActivationStats, Welford


def pass_blocks(
    spec: RowSource, options: GeneratorOptions, max_rows: int | None = None
) -> Iterator[tuple[RowBlock, int]]:
    """``(block, rows to use)`` of the pass in generation order, computed or read in this process,
    stopping after ``max_rows`` rows. ``options`` never name a write-through file here (see
    ``GeneratorOptions.in_process``): only the generator writes it."""
    if options.write_hdf5 is not None:
        raise ValueError("a pass run in the training process never writes the write-through file")
    used = 0
    graph = spec.rows_graph(ResumePlan.fresh(), options)
    try:
        for block in Loader(graph):
            if block.rows is None:  # read from a file: materialise it
                array = np.empty((len(block), *spec.row_shape), storage_dtype(spec.dtype))
                block.read_into(array.view(np.uint8), 0, len(block))
                block.rows = from_storage(array, spec.dtype)
            take = len(block) if max_rows is None else min(len(block), max_rows - used)
            yield block, take
            used += take
            if used == max_rows:
                return
    finally:
        graph.close()  # a pass stopped early leaves no file open in this process


def compute_stats(spec: RowSource, options: GeneratorOptions, rows: int) -> ActivationStats:
    """Mean, std and mean norm over the first ``rows`` rows of the pass (fewer if the pass is shorter)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
        raise ValueError(f"stats rows: expected a positive integer, got {rows!r}")
    welford = Welford()
    for block, take in pass_blocks(spec, options, rows):
        welford.update(block.rows[:take])
    return welford.result()


def write_cache(
    spec: StreamSpec,
    options: GeneratorOptions,
    path: str | os.PathLike,
    max_rows: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Run the model over the stream in this process and write its rows (at most ``max_rows``), with
    their statistics."""
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows <= 0):
        raise ValueError(f"max_rows: expected a positive integer or None, got {max_rows!r}")
    dtype = dtype or spec.dtype
    writer = Hdf5RowWriter(path, spec.row_shape, dtype, spec.file_attrs())
    try:
        bar = tqdm(total=max_rows, unit="rows", unit_scale=True, disable=not progress, desc="actvpipe cache")
        with bar:
            for block, take in pass_blocks(spec, options, max_rows):
                bar.update(writer.write(block, take))
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
