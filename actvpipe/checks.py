"""Argument checks of the fluent API: each raises before any work starts, naming the argument and the fix."""

from __future__ import annotations

import io
import os
import pickle
import types
from collections.abc import Sequence
from typing import Any

import torch

from actvpipe.shm import SHM_DIR, buffer_nbytes


def resolve_device(device: str) -> str:
    """ "auto" stays adaptive when CUDA is available, else is the CPU; an explicit CUDA device
    without CUDA is an error."""
    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device: {device!r} requested but CUDA is not available; pass device='cpu' or 'auto'"
        )
    return device


def check_deterministic_device(deterministic: bool, device: str) -> None:
    """``device="auto"`` moves the forward between GPU and CPU on the buffer's fill, which timing
    decides, and the two give different bits: no bitwise replay with it."""
    if deterministic and device == "auto":
        raise ValueError(
            "device: 'auto' switches between the GPU and the CPU as the buffer fills, so the rows' bits "
            "depend on timing; with deterministic=True pass device='cuda' (or 'cpu')"
        )


def check_positive_int(name: str, value: Any) -> None:
    """A size or count: an int above zero (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def check_shared_memory(size: int, row_shape: tuple[int, ...], dtype: torch.dtype, n_sources: int) -> None:
    """A buffer must fit in the free space of /dev/shm, or writing it would die of SIGBUS later."""
    needed = buffer_nbytes(size, row_shape, dtype, n_sources)
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return  # no /dev/shm: SharedRowBuffer.create says so when the loader starts
    free = stat.f_bavail * stat.f_frsize
    if needed > free:
        gib = 1 << 30
        raise ValueError(
            f"size: a buffer of {size:,} rows takes {needed / gib:,.2f} GiB of shared memory but {SHM_DIR} "
            f"has {free / gib:,.2f} GiB free; pass a smaller size (at most about "
            f"{int(size * free / needed):,} rows) or enlarge {SHM_DIR} (docker: --shm-size)"
        )


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's shard: as given, else torch.distributed's rank and world size, else (0, 1)."""
    if rank is None and world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError("rank, world_size: pass both (or neither, to use torch.distributed's)")
    check_positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an integer in 0..{world_size - 1}, got {rank!r}")
    return rank, world_size


def check_token_ids(ids: Sequence[int], config: Any) -> tuple[int, ...]:
    """Token ids of this model's vocabulary, sorted and deduplicated."""
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(ids, int | str):
        ids = [ids]
    bad = [
        i
        for i in ids
        if isinstance(i, bool) or not isinstance(i, int) or i < 0 or (vocab is not None and i >= vocab)
    ]
    if bad:
        raise ValueError(
            f"exclude_tokens: {bad} are not token ids of this model (0..{vocab}); pass integer ids"
        )
    return tuple(sorted(set(ids)))


def check_layers(layers: Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    """Layer indices in range, sorted and deduplicated; None means every layer."""
    if layers is None:
        return tuple(range(n_layers))
    layers = sorted(set(layers))
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers]
    if bad or not layers:
        raise ValueError(f"layers: {bad or 'empty'} out of range; the model has layers 0..{n_layers - 1}")
    return tuple(layers)


class _DefinedInMain(Exception):
    pass


class _MainFinder(pickle.Pickler):
    """Pickles as usual, but stops at a class or function defined in ``__main__``."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", None) == "__main__":
            raise _DefinedInMain(obj)
        return NotImplemented


def pickle_for_generator(obj: Any, what: str) -> bytes:
    """``obj`` pickled for a generator process, which cannot import the user's script: a class or
    function defined there (a generator function behind an ``IterableDataset``, a tokenizer
    subclass) is an error now, naming it and the fix, not a failure inside the generator later."""
    sink = io.BytesIO()
    try:
        _MainFinder(sink, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except _DefinedInMain as found:
        name = getattr(found.args[0], "__qualname__", repr(found.args[0]))
        raise ValueError(
            f"{what}: uses {name}, defined in the script you run (__main__), which the generator "
            f"process cannot import; move {name} into a module of its own (say my_data.py beside "
            "your script) and import it from there"
        ) from None
    return sink.getvalue()
