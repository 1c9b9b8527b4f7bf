"""The fluent API: ``stream(...)`` -> ``.buffer(size)`` -> ``.batch(b)`` -> an ``ActivationLoader``."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torchdata.nodes import Loader
from torchdata.nodes.loader import LoaderIterator

from actvpipe.cache import compute_stats
from actvpipe.capture import DEFAULT_CAPTURE, check_capture, describe_capture
from actvpipe.checks import (
    check_layers,
    check_positive_int,
    check_shared_memory,
    check_token_ids,
    resolve_device,
    resolve_rank,
)
from actvpipe.device_copy import batch_device
from actvpipe.documents import resolve_dataset
from actvpipe.hdf5 import FORMAT, check_matching, dtype_name, expand_paths, open_cache_file
from actvpipe.mixing import Mixing
from actvpipe.models import check_capture_modules, common_dims, resolve_models
from actvpipe.monitor import Monitor
from actvpipe.placement import DEFAULT_WATERMARKS, check_watermarks
from actvpipe.resume import check_fingerprint
from actvpipe.sampling import Batching, BufferBatcher, TokenBatch
from actvpipe.spec import Hdf5Spec, StreamSpec
from actvpipe.stats import NORMALIZATIONS, ActivationStats, Normalization
from actvpipe.text import PACKINGS
from actvpipe.write_through import check_continuation, check_write_target

GPT2_DEFAULTS = {
    "model": "openai-community/gpt2",
    "dataset": "Skylion007/openwebtext",
    "context_length": 1024,
}


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
    of the ``capture`` points (default MLP in and out, k = 2). A list of models (same tokenizer and
    width) gives rows ``[n_models, k, n_layers, d_model]``: every model at the same token.

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
    watermarks = check_watermarks(watermarks)
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
        device=device,
        watermarks=watermarks,
        seed=seed,
        exclude_bos=exclude_bos,
        exclude_tokens=exclude_tokens,
        packing=packing,
        rank=rank,
        world_size=world_size,
        deterministic=deterministic,
    )
    return ActivationStream(spec)


def gpt2_stream(**overrides: Any) -> ActivationStream:
    """GPT-2 small on OpenWebText, context 1024: rows ``[2, 12, 768]`` (needs the Hugging Face hub)."""
    return stream(**{**GPT2_DEFAULTS, **overrides})


def from_hdf5(
    paths: str | os.PathLike | Sequence[str | os.PathLike], *, seed: int = 0, deterministic: bool = False
) -> ActivationStream:
    """A stream over cached rows (a path, a list, or a glob), validated before any work starts."""
    files = tuple(open_cache_file(p) for p in expand_paths(paths))
    check_matching(files[1:], files[0].attrs, f"the first file {files[0].path!r}")
    return ActivationStream(Hdf5Spec(files, seed=seed, deterministic=deterministic))


class ActivationStream:
    """A validated description of a stream; ``.buffer(size)`` adds the shared shuffle buffer."""

    def __init__(self, spec: StreamSpec | Hdf5Spec):
        self.spec = spec

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
        if not isinstance(self.spec, StreamSpec):
            raise TypeError("to_hdf5: this stream already reads HDF5 files; copy the files instead")
        from actvpipe.cache import write_cache

        return write_cache(self.spec, path, max_rows, dtype, progress)

    @property
    def row_shape(self) -> tuple[int, int, int]:
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
        stats_rows: int = 100_000,
        write_hdf5: str | os.PathLike | None = None,
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
        (README, "Write-through cache").
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
        disk = () if hdf5 is None else (self._disk_source(hdf5, hdf5_fraction),)
        spec = self.spec
        if write_hdf5 is not None:
            if not isinstance(spec, StreamSpec):
                raise TypeError("write_hdf5: this stream already reads HDF5 files; copy the files instead")
            target = check_write_target(write_hdf5, spec)
            spec = dataclasses.replace(spec, write_hdf5=target)
        monitor = Monitor(log_dir, progress, refresh_interval)
        return BufferedStream(spec, size, warmup, disk, hdf5_fraction, monitor, normalize, stats_rows)

    def stats(self, rows: int = 100_000) -> ActivationStats:
        """Mean, std (per element) and mean norm (per capture point and layer) of the first ``rows``
        rows of the pass, computed in this process (Welford, float64)."""
        return compute_stats(self.spec, rows)

    def _disk_source(self, paths, fraction: float | None) -> Hdf5Spec:
        if not isinstance(self.spec, StreamSpec):
            raise TypeError(
                "hdf5: interleaving mixes cached rows into a live stream; use actvpipe.stream(...)"
            )
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


class BufferedStream:
    """A stream with its buffer (and any disk source mixed in); ``.batch(b)`` builds the loader."""

    def __init__(
        self,
        spec: StreamSpec | Hdf5Spec,
        size: int,
        warmup: float,
        disk: tuple[Hdf5Spec, ...] = (),
        hdf5_fraction: float | None = None,
        monitor: Monitor | None = None,
        normalize: str | None = None,
        stats_rows: int = 100_000,
    ):
        self.spec, self.size, self.warmup = spec, size, warmup
        self.disk, self.hdf5_fraction = disk, hdf5_fraction
        self.monitor = monitor or Monitor(None, False, 1.0)
        self.normalize, self.stats_rows = normalize, stats_rows

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
        return ActivationLoader(self, batch_size, drop_last, with_tokens, pin_memory, device)


class ActivationLoader:
    """Iterable of batches ``[batch, k, n_layers, d_model]``, driven by a ``torchdata.nodes.Loader``.

    ``start()`` launches the generator and returns at once; iterating starts it implicitly; each new
    iteration after a finished pass starts a new pass. ``close()`` (or leaving a ``with`` block)
    stops the generator and frees the shared memory. ``state_dict()`` / ``load_state_dict()``
    checkpoint the loader exactly (see README, "Checkpointing").
    """

    def __init__(
        self,
        buffered: BufferedStream,
        batch_size: int,
        drop_last: bool,
        with_tokens: bool,
        pin_memory: bool = False,
        device: torch.device | None = None,
    ):
        self.spec = buffered.spec
        self.buffer_size = buffered.size
        self.batch_size = batch_size
        sources = [self.spec, *buffered.disk]
        mixing = Mixing(
            size=buffered.size,
            min_fill=max(1, round(buffered.warmup * buffered.size), batch_size),
            n_sources=len(sources),
            fraction=buffered.hdf5_fraction,
            deterministic=self.spec.deterministic,
            disk_rows=sum(f.rows for disk in buffered.disk for f in disk.files),
        )
        batching = Batching(batch_size, drop_last, with_tokens, pin_memory, device)
        self._node = BufferBatcher(sources, batching, mixing, buffered.normalize, buffered.stats_rows)
        self._loader = Loader(self._node)
        self._loaded: dict[str, Any] | None = None
        self._monitor = buffered.monitor
        self._monitor.disk_sources = tuple(isinstance(s, Hdf5Spec) for s in sources)
        self._monitor.watermarks = self.spec.watermarks if isinstance(self.spec, StreamSpec) else None

    def start(self) -> ActivationLoader:
        """Launch the generators (for the loaded state, if any) and return at once."""
        self._node.start(self._loaded)
        return self

    def __iter__(self) -> Iterator[torch.Tensor | TokenBatch]:
        batches = iter(self._loader)
        self._loaded = None
        return self._monitored(batches) if self._monitor.active else batches

    def _monitored(self, batches: Iterator) -> Iterator[torch.Tensor | TokenBatch]:
        """Time each wait for a batch and let the monitor sample the counters."""
        try:
            while True:
                start = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                self._monitor.after_batch(self._node.run, len(batch), time.perf_counter() - start)
                yield batch
        finally:
            self._monitor.end_pass()  # stdout is the user's again once iteration ends, however it ends

    def state_dict(self) -> dict[str, Any]:
        """Plain picklable state of the latest iterator: a few integers and 4-8 bytes per buffered row."""
        return self._loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` at the next iteration (call before iterating).

        Raises ``ValueError`` at once, listing each difference, if ``state`` was saved by a loader
        built with other arguments, or if ``write_hdf5`` names a file that does not hold the rows
        served before the save (it would be left with a gap).
        """
        root = state[LoaderIterator.ROOT_KEY]
        check_fingerprint(root["fingerprint"], self._node.fingerprint())
        if isinstance(self.spec, StreamSpec) and self.spec.write_hdf5 is not None:
            check_continuation(self.spec, int(root["frontiers"][0]))
        self._loader = Loader(self._node)  # torchdata 0.11 ignores a load after an earlier state_dict()
        self._loader.load_state_dict(state)
        self._loaded = state[LoaderIterator.ROOT_KEY]  # what start() launches the generators for

    def stats(self) -> ActivationStats:
        """Statistics of the first ``stats_rows`` rows (see ``.buffer``): tensors, and ``.to_json()``."""
        return self._node.stats()

    @property
    def normalization(self) -> Normalization | None:
        """The ``(x - shift) * scale`` applied to served batches, once started (None: raw rows)."""
        return self._node.normalization

    def close(self) -> None:
        self._monitor.close()
        self._node.close()

    def __enter__(self) -> ActivationLoader:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def counters(self) -> dict[str, int]:
        """Rows ``written`` by the generators, ``published`` (sampleable), ``served``, ``computed`` by the
        sources, and the current ``fill``, for the current pass (all zero before ``start()``)."""
        run = self._node.run
        names = ("written", "published", "served", "computed")
        if run is None:
            return dict.fromkeys((*names, "fill"), 0)
        trainer = run.ledger.counts
        counts = {"written": run.buffer.total("written"), "computed": run.buffer.total("computed")}
        return {
            **counts,
            "published": sum(trainer.published),
            "served": trainer.served,
            "fill": trainer.n_full,
        }

    @property
    def generator_pid(self) -> int | None:
        """PID of the current generator process (None before ``start()``)."""
        run = self._node.run
        return run.generators.process.pid if run is not None else None
