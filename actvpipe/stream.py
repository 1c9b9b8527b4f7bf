"""The fluent API's descriptions: ``stream(...)`` -> ``.buffer(size)`` -> ``.batch(b)``.

Each is a pure value: building one checks its arguments (and loads configs, not weights) but opens
no file, starts no process and keeps no writer; the ``ActivationLoader`` that ``.batch()`` returns
creates all of that when it starts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from actvpipe.batches import Batching
from actvpipe.capture import DEFAULT_CAPTURE, check_capture, describe_capture
from actvpipe.checks import (
    check_deterministic_device,
    check_layers,
    check_positive_int,
    check_shared_memory,
    check_token_ids,
    resolve_device,
    resolve_rank,
)
from actvpipe.demo import DEMO_CONTEXT, corpus_path, demo_model_dir
from actvpipe.device_copy import batch_device
from actvpipe.documents import resolve_dataset
from actvpipe.hdf5 import FORMAT, check_matching, dtype_name, expand_paths, open_cache_file
from actvpipe.hook_names import check_hook_names, resolve_hook_names
from actvpipe.loader import ActivationLoader
from actvpipe.local_pass import compute_stats, write_cache
from actvpipe.models import check_capture_modules, common_dims, resolve_models
from actvpipe.placement import DEFAULT_WATERMARKS, check_watermarks
from actvpipe.spec import GeneratorOptions, Hdf5Spec, RowSource, StreamSpec
from actvpipe.stats import NORMALIZATIONS, STATS_ROWS, ActivationStats
from actvpipe.text import PACKINGS
from actvpipe.write_through import check_write_target

GPT2_DEFAULTS = {
    "model": "openai-community/gpt2",
    "dataset": "Skylion007/openwebtext",
    "context_length": 1024,
}

# A row survives 32 turnovers of uniform sampling with probability e^-32: a longer bound bounds nothing,
# and its publish log (``AgeBound``) would grow with it.
MAX_AGE_LIMIT = 32


def stream(
    model: Any,
    dataset: Any,
    *,
    tokenizer: Any = None,
    text_column: str = "text",
    context_length: int = 1024,
    layers: Sequence[int] | None = None,
    capture: Sequence[str] = DEFAULT_CAPTURE,
    modules: Sequence[str] | None = None,
    generation_batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    model_dtype: torch.dtype | None = None,
    device: str = "auto",
    watermarks: tuple[float, float] = DEFAULT_WATERMARKS,
    seed: int = 0,
    exclude_bos: bool = True,
    exclude_tokens: Sequence[int] = (),
    packing: str = "concat",
    rank: int | None = None,
    world_size: int | None = None,
    deterministic: bool = False,
) -> ActivationStream:
    """Describe a stream of ``model``'s activations over ``dataset``: rows ``[k, n_layers, d_model]``
    of the ``capture`` points (default MLP in and out, k = 2), named as ours or as TransformerLens hook
    names (``"hook_mlp_out"`` with ``layers=``, or ``"blocks.3.hook_mlp_out"``; README, "Hook names").
    A list of models (same tokenizer and width) gives rows ``[n_models, k, n_layers, d_model]``:
    every model at the same token.

    Everything is checked here, before any process starts: the model's config and tokenizer load,
    the dataset exists and has ``text_column``, and the shapes fit the model. ``dtype`` is the
    buffer's, ``model_dtype`` the forward's (default: ``dtype``). ``device="auto"`` moves the model
    between GPU and CPU on buffer fill, per ``watermarks`` (low, high); without CUDA it is the CPU.
    ``deterministic=True`` makes the batches a pure function of the arguments and ``seed``.
    Under ``torch.distributed`` (or with ``rank=``/``world_size=``) each rank streams a disjoint,
    balanced shard of the contexts.
    """
    check_positive_int("generation_batch_size", generation_batch_size)
    for name, value in (("dtype", dtype), ("model_dtype", model_dtype or dtype)):
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise TypeError(f"{name}: expected a floating torch.dtype such as torch.float32, got {value!r}")
    device = resolve_device(device)
    check_deterministic_device(deterministic, device)
    watermarks = check_watermarks(watermarks)
    capture_names = capture
    capture, layers = resolve_hook_names(capture, layers)
    capture = check_capture(capture)
    source, configs = resolve_models(model, tokenizer)
    sources = source if isinstance(source, tuple) else (source,)
    n_layers, d_model, max_len = common_dims(sources, configs, layers)
    check_positive_int("context_length", context_length)
    if context_length < 2:
        raise ValueError("context_length: must be at least 2 (BOS plus one token); pass a larger value")
    if max_len is not None and context_length > max_len:
        raise ValueError(
            f"context_length: {context_length} exceeds the model's maximum of {max_len}; "
            f"pass context_length={max_len} or less"
        )
    layers = check_layers(layers, n_layers)
    if packing not in PACKINGS:
        raise ValueError(f"packing: expected one of {PACKINGS}, got {packing!r}")
    exclude_tokens = check_token_ids(exclude_tokens, configs[0])
    rank, world_size = resolve_rank(rank, world_size)
    check_hook_names(capture_names, [config.model_type for config in configs])
    for each, config in zip(sources, configs, strict=True):
        check_capture_modules(each, config, layers, capture, modules)
    dataset_source = resolve_dataset(dataset, text_column)
    spec = StreamSpec(
        model=source,
        dataset=dataset_source,
        context_length=context_length,
        layers=layers,
        capture=capture,
        modules=None if modules is None else tuple(modules),
        d_model=d_model,
        generation_batch_size=generation_batch_size,
        dtype=dtype,
        model_dtype=model_dtype,
        seed=seed,
        exclude_bos=exclude_bos,
        exclude_tokens=exclude_tokens,
        packing=packing,
        rank=rank,
        world_size=world_size,
        deterministic=deterministic,
    )
    return ActivationStream(spec, GeneratorOptions(device, watermarks))


def gpt2_stream(**overrides: Any) -> ActivationStream:
    """GPT-2 small on OpenWebText, context 1024: rows ``[2, 12, 768]`` (needs the Hugging Face hub)."""
    return stream(**{**GPT2_DEFAULTS, **overrides})


def demo_stream(**overrides: Any) -> ActivationStream:
    """The embedded default, offline: a tiny GPT-2-architecture model on the bundled corpus, context
    128, rows ``[2, 4, 64]`` (see ``actvpipe.demo``)."""
    args = {"model": str(demo_model_dir()), "dataset": str(corpus_path()), "context_length": DEMO_CONTEXT}
    return stream(**{**args, **overrides})


def from_hdf5(
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, seed: int = 0, deterministic: bool = False
) -> ActivationStream:
    """A stream over cached rows (a path, a list, or a glob), validated before any work starts."""
    files = tuple(open_cache_file(p) for p in expand_paths(paths))
    check_matching(files[1:], files[0].attrs, f"the first file {files[0].path!r}")
    return ActivationStream(Hdf5Spec(files, seed=seed, deterministic=deterministic))


@dataclass(frozen=True)
class ActivationStream:
    """A validated description of a stream: what its rows are (``spec``) and how a run produces them
    (``options``). ``.buffer(size)`` adds the shared shuffle buffer."""

    spec: RowSource
    options: GeneratorOptions = dataclasses.field(default_factory=GeneratorOptions)

    def to_hdf5(
        self,
        path: str | os.PathLike,
        max_rows: int | None = None,
        dtype: torch.dtype | None = None,
        progress: bool = True,
    ) -> Path:
        """Write a finite pass (or its first ``max_rows`` rows), in generation order, to one HDF5 file.

        Runs the model in this process; ``dtype`` is the storage dtype (default: the stream's).
        """
        self.spec.require_live("to_hdf5")
        return write_cache(self.spec, self.options.in_process(), path, max_rows, dtype, progress)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.spec.row_shape

    def buffer(
        self,
        size: int,
        *,
        warmup: float = 0.5,
        hdf5: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        hdf5_fraction: float | None = None,
        log_dir: str | os.PathLike | None = None,
        progress: bool | None = None,
        refresh_interval: float = 0.5,
        normalize: str | None = None,
        stats_rows: int = STATS_ROWS,
        write_hdf5: str | os.PathLike | None = None,
        progress_timeout: float = 600.0,
        max_age: float | None = None,
    ) -> BufferedStream:
        """A shuffle buffer of ``size`` rows; batches are served while it holds ``warmup * size`` rows.

        ``hdf5`` (a path, list or glob) mixes cached rows with live ones for the whole pass: disk rows
        fill the buffer first, then make up ``hdf5_fraction`` of the rows served, or as many as the
        disk delivers when it is None. A finite pass serves every live and every file row once.
        ``log_dir`` writes TensorBoard scalars; ``progress`` shows the one-line dashboard on stderr
        (default: when stderr is a terminal); both refresh every ``refresh_interval`` seconds.
        ``normalize="sqrt_d"|"standardize"`` normalises served batches with statistics of the first
        ``stats_rows`` rows, computed in this process when the loader first starts.
        ``write_hdf5`` also writes every live row the pass generates to that file, in generation
        order, as ``to_hdf5`` would: the first run streams and caches, later runs read the cache
        (README, "Write-through cache"). Only the generator process writes it.
        ``progress_timeout``: a wait for rows during which no generator produces one for this many
        seconds raises ``GeneratorError`` naming what each was doing (a hung read, a stuck model).
        ``max_age`` bounds a row's stay: a row published ``max_age * size`` rows ago is served in the
        next batch, mixed in with uniform draws (None: no bound). A restore then re-runs about
        ``max_age`` buffers' worth of blocks instead of ~ln(rows per block); 1.5 is the value README
        measures (README, "Restore cost").
        """
        check_positive_int("size", size)
        check_shared_memory(size, self.spec.row_shape, self.spec.dtype, 1 + (hdf5 is not None))
        if not 0.0 <= warmup <= 1.0:
            raise ValueError(f"warmup: a fraction of the buffer between 0 and 1, got {warmup!r}")
        if isinstance(refresh_interval, bool) or not (
            isinstance(refresh_interval, int | float) and refresh_interval >= 0
        ):
            raise ValueError(
                f"refresh_interval: expected seconds >= 0 (0: after every batch), got {refresh_interval!r}"
            )
        if normalize is not None and normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize: expected one of {NORMALIZATIONS} or None, got {normalize!r}")
        check_positive_int("stats_rows", stats_rows)
        if isinstance(progress_timeout, bool) or not (
            isinstance(progress_timeout, int | float) and progress_timeout > 0
        ):
            raise ValueError(f"progress_timeout: expected seconds > 0, got {progress_timeout!r}")
        if max_age is not None and (
            isinstance(max_age, bool)
            or not isinstance(max_age, int | float)
            or not 0 < max_age <= MAX_AGE_LIMIT
        ):
            raise ValueError(
                f"max_age: expected buffer turnovers in (0, {MAX_AGE_LIMIT}] (say 1.5), or None for no "
                f"bound; got {max_age!r}"
            )
        disk = () if hdf5 is None else (self._disk_source(hdf5, hdf5_fraction),)
        options = self.options
        if write_hdf5 is not None:
            self.spec.require_live("write_hdf5")
            options = dataclasses.replace(options, write_hdf5=check_write_target(write_hdf5, self.spec))
        return BufferedStream(
            ActivationStream(self.spec, options),
            size,
            warmup,
            disk,
            hdf5_fraction,
            None if log_dir is None else os.fspath(log_dir),
            progress,
            refresh_interval,
            normalize,
            stats_rows,
            float(progress_timeout),
            None if max_age is None else float(max_age),
        )

    def stats(self, rows: int = STATS_ROWS) -> ActivationStats:
        """Mean, std (per element) and mean norm (per capture point and layer) of the first ``rows``
        rows of the pass, computed in this process (Welford, float64)."""
        return compute_stats(self.spec, self.options.in_process(), rows)

    def _disk_source(self, paths, fraction: float | None) -> Hdf5Spec:
        self.spec.require_live("hdf5")
        if fraction is not None and not 0.0 < fraction < 1.0:
            raise ValueError(
                f"hdf5_fraction: a fraction between 0 and 1 (exclusive), or None; got {fraction!r}"
            )
        if self.spec.deterministic and fraction is None:
            raise ValueError(
                "hdf5: with deterministic=True disk rows are mixed in at a fixed share; "
                "pass hdf5_fraction= (say 0.5), or deterministic=False to mix them as fast as they come"
            )
        disk = from_hdf5(paths).spec
        expected = {
            "format": FORMAT,
            "n_models": self.spec.n_models,
            "capture": describe_capture(self.spec.capture),
            "layers": list(self.spec.layers),
            "d_model": self.spec.d_model,
            "dtype": dtype_name(self.spec.dtype),
        }
        check_matching(disk.files, expected, "this stream")
        return disk


@dataclass(frozen=True)
class BufferedStream:
    """A stream with its buffer (and any disk source mixed in), and how a loader over it is watched;
    ``.batch(b)`` describes the loader. Each loader opens its own monitor when it starts."""

    stream: ActivationStream
    size: int
    warmup: float
    disk: tuple[Hdf5Spec, ...]
    hdf5_fraction: float | None
    log_dir: str | None
    progress: bool | None
    refresh_interval: float
    normalize: str | None
    stats_rows: int
    progress_timeout: float
    max_age: float | None = None

    @property
    def spec(self) -> RowSource:
        return self.stream.spec

    @property
    def options(self) -> GeneratorOptions:
        return self.stream.options

    def batch(
        self,
        batch_size: int,
        drop_last: bool = False,
        with_tokens: bool = False,
        pin_memory: bool = False,
        device: str | torch.device | None = None,
    ) -> ActivationLoader:
        """Batches of ``batch_size`` rows; ``with_tokens=True`` yields ``TokenBatch`` records.

        Batches are gathered into a few pooled tensors, each reused only once nothing references it
        any more (no batch, view or array of it is alive): a batch you keep stays intact, and the
        memory of one you dropped is reused without new allocations or page faults.
        ``pin_memory=True`` (CUDA only) gathers into pinned memory instead. ``device="cuda"`` (or
        ``"cuda:N"``) yields tensors on that GPU: rows are gathered into pinned memory and copied on a
        side stream that the current stream waits on, so the host never blocks on the copy.
        """
        check_positive_int("batch_size", batch_size)
        device = batch_device(device)
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory: needs CUDA, which is not available here; pass pin_memory=False")
        if batch_size > self.size:
            raise ValueError(
                f"batch_size: {batch_size} is larger than the buffer ({self.size} rows); "
                f"pass .buffer(size) with size >= {batch_size} or a smaller batch_size"
            )
        return ActivationLoader(self, Batching(batch_size, drop_last, with_tokens, pin_memory, device))
