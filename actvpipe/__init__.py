"""actvpipe: fast, exact, resumable streaming of transformer activations to interpretability training."""

from actvpipe.batches import TokenBatch
from actvpipe.config import (
    DataLoaderConfig,
    actvs_loader_from_config,
    actvs_loader_from_production_config,
    actvs_loader_from_test_config,
)
from actvpipe.generator import GeneratorError
from actvpipe.loader import ActivationLoader
from actvpipe.stats import ActivationStats
from actvpipe.stream import ActivationStream, BufferedStream, demo_stream, from_hdf5, gpt2_stream, stream
from actvpipe.version import __version__

__all__ = [
    "ActivationLoader",
    "ActivationStats",
    "ActivationStream",
    "BufferedStream",
    "DataLoaderConfig",
    "GeneratorError",
    "TokenBatch",
    "actvs_loader_from_config",
    "actvs_loader_from_production_config",
    "actvs_loader_from_test_config",
    "demo_stream",
    "from_hdf5",
    "gpt2_stream",
    "stream",
    "__version__",
]
