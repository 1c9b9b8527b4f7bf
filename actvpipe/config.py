"""The original design's API: ``DataLoaderConfig`` and its factory functions, as thin wrappers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actvpipe.defaults import default_of
from actvpipe.demo import DEMO_CONTEXT, corpus_path, demo_model_dir
from actvpipe.loader import ActivationLoader
from actvpipe.stream import GPT2_DEFAULTS, ActivationStream, stream

# The defaults the config shares with the fluent API, read from the API's signatures.
STREAM_DTYPE = default_of(stream, "dtype")
GENERATION_BATCH_SIZE = default_of(stream, "generation_batch_size")
REFRESH_INTERVAL = default_of(ActivationStream.buffer, "refresh_interval")


@dataclass
class DataLoaderConfig:
    """Settings of the original design; ``max_sequence_length`` is the context length. Defaults are
    GPT-2 small's, and ``stream()``'s and ``.buffer()``'s for the options they share."""

    buffer_size: int = 1_000_000
    activation_dim: int = 768
    n_layers: int = 12
    model_name: str = GPT2_DEFAULTS["model"]
    model_dtype: torch.dtype = STREAM_DTYPE
    dataset_name: str = GPT2_DEFAULTS["dataset"]
    max_sequence_length: int = GPT2_DEFAULTS["context_length"]
    generation_batch_size: int = GENERATION_BATCH_SIZE
    refresh_interval: float = REFRESH_INTERVAL
    max_batch_size: int = 500_000


def actvs_loader_from_config(config: DataLoaderConfig, batch_size: int) -> ActivationLoader:
    """A loader for ``config``; ``activation_dim`` and ``n_layers`` must match the model."""
    if batch_size > config.max_batch_size:
        raise ValueError(
            f"batch_size: {batch_size} exceeds config.max_batch_size={config.max_batch_size}; "
            "raise max_batch_size or pass a smaller batch_size"
        )
    s = stream(
        config.model_name,
        config.dataset_name,
        context_length=config.max_sequence_length,
        generation_batch_size=config.generation_batch_size,
        dtype=config.model_dtype,
    )
    _, n_layers, d_model = s.row_shape
    mismatches = [
        f"{field}={given} but the model has {actual}"
        for field, given, actual in (
            ("activation_dim", config.activation_dim, d_model),
            ("n_layers", config.n_layers, n_layers),
        )
        if given != actual
    ]
    if mismatches:
        raise ValueError(f"DataLoaderConfig does not match {config.model_name!r}: {'; '.join(mismatches)}")
    return s.buffer(config.buffer_size, refresh_interval=config.refresh_interval).batch(batch_size)


def demo_config() -> DataLoaderConfig:
    """Small buffer over the embedded offline default (tiny model, bundled corpus): fast start, no network."""
    return DataLoaderConfig(
        buffer_size=8192,
        activation_dim=64,
        n_layers=4,
        model_name=str(demo_model_dir()),
        dataset_name=str(corpus_path()),
        max_sequence_length=DEMO_CONTEXT,
        generation_batch_size=16,
    )


def actvs_loader_from_test_config(batch_size: int) -> ActivationLoader:
    """A small loader over the embedded default (offline), for tests and quick experiments."""
    return actvs_loader_from_config(demo_config(), batch_size)


def actvs_loader_from_production_config(
    batch_size: int, buffer_size: int = 1_000_000, generation_batch_size: int = 64
) -> ActivationLoader:
    """GPT-2 small on OpenWebText with a large buffer (needs the Hugging Face hub)."""
    config = DataLoaderConfig(buffer_size=buffer_size, generation_batch_size=generation_batch_size)
    return actvs_loader_from_config(config, batch_size)
