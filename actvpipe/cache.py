"""The cache job: write a stream's finite pass, in generation order, to an HDF5 file (``to_hdf5``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchdata.nodes import Loader
from tqdm import tqdm

from actvpipe.capture import describe_capture
from actvpipe.generator import build_rows_graph
from actvpipe.hdf5 import Hdf5RowWriter, dtype_name
from actvpipe.resume import ResumePlan
from actvpipe.spec import StreamSpec

PACKING_DESCRIPTIONS = {
    "concat": "concat: documents + EOS, chunks of context_length - 1, BOS prepended",
    "truncate": "truncate: one document per context: BOS + document + EOS, cut to context_length",
}


def cache_attrs(spec: StreamSpec) -> dict:
    """What the file records about how its rows were made."""
    from actvpipe import __version__

    tokenizer = (
        spec.model.tokenizer if isinstance(spec.model.tokenizer, str) else type(spec.model.tokenizer).__name__
    )
    return {
        "model": spec.model.name,
        "config_hash": spec.model.config_hash,
        "tokenizer": tokenizer,
        "dataset": spec.dataset.describe(),
        "layers": list(spec.layers),
        "capture": describe_capture(spec.capture),
        "d_model": spec.d_model,
        "context_length": spec.context_length,
        "packing": PACKING_DESCRIPTIONS[spec.packing],
        "exclude_tokens": list(spec.exclude_tokens),
        "exclude_bos": spec.exclude_bos,
        "model_dtype": dtype_name(spec.compute_dtype),
        "actvpipe_version": __version__,
    }


def write_cache(
    spec: StreamSpec,
    path: str | os.PathLike,
    max_rows: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Run the model over the stream in this process and write its rows (at most ``max_rows``)."""
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows <= 0):
        raise ValueError(f"max_rows: expected a positive integer or None, got {max_rows!r}")
    dtype = dtype or spec.dtype
    writer = Hdf5RowWriter(path, spec.row_shape, dtype, cache_attrs(spec))
    try:
        bar = tqdm(total=max_rows, unit="rows", unit_scale=True, disable=not progress, desc="actvpipe cache")
        with bar:
            for block in Loader(build_rows_graph(spec, ResumePlan.fresh())):
                remaining = None if max_rows is None else max_rows - writer.rows
                bar.update(writer.write(block, remaining))
                if writer.rows == max_rows:
                    break
    except BaseException:
        writer.abort()
        raise
    return writer.finish()
