"""Content fingerprints: what a saved state checks to tell that data or weights changed underneath it.

Files are identified by size, modification time and a hash of their first and last MiB (cheap for
any size); documents held in memory by a hash of all of them, computed once; a loaded model by a
hash of the ends of each parameter.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

EDGE = 1 << 20  # bytes hashed at each end of a file
TENSOR_EDGE = 1 << 16  # bytes hashed at each end of a parameter
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def file_digest(path: str | os.PathLike) -> str:
    """``size:mtime_ns:hash`` of a file, the hash over its first and last MiB."""
    stat = os.stat(path)
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        digest.update(f.read(EDGE))
        if stat.st_size > EDGE:
            f.seek(max(EDGE, stat.st_size - EDGE))
            digest.update(f.read(EDGE))
    return f"{stat.st_size}:{stat.st_mtime_ns}:{digest.hexdigest()}"


def files_digest(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    return {os.fspath(p): file_digest(p) for p in paths}


def model_files_digest(directory: str | os.PathLike) -> dict[str, str]:
    """The config and weight files of a saved model directory."""
    root = Path(directory)
    files = [p for p in sorted(root.iterdir()) if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES]
    return {p.name: file_digest(p) for p in files}


def documents_digest(documents: Iterable[Any]) -> str:
    """A hash of every document (text or token ids), in order."""
    digest = hashlib.blake2b(digest_size=8)
    for doc in documents:
        if isinstance(doc, str):
            data = doc.encode()
        else:
            array = np.asarray(doc)  # token ids; anything else (None, a stray object) by its repr
            data = repr(doc).encode() if array.dtype == object else array.tobytes()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def parameters_digest(model: Any) -> str:
    """A hash of a loaded model's parameters and buffers: names, shapes, dtypes and the first and last
    64 KiB of each (any training step changes those; hashing every byte of a 7B model would not be
    cheap)."""
    digest = hashlib.blake2b(digest_size=8)
    for name, tensor in model.state_dict().items():
        raw = tensor.detach().reshape(-1).view(torch.uint8)
        edge = TENSOR_EDGE if raw.numel() > 2 * TENSOR_EDGE else raw.numel()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(raw[:edge].cpu().numpy().tobytes())
        digest.update(raw[-edge:].cpu().numpy().tobytes())
    return digest.hexdigest()
