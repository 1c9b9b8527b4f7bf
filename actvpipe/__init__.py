"""actvpipe: fast, exact, resumable streaming of transformer activations to interpretability training."""

from actvpipe.config import (
    DataLoaderConfig,
    actvs_loader_from_config,
    actvs_loader_from_production_config,
    actvs_loader_from_test_config,
)
from actvpipe.demo import demo_stream
from actvpipe.generator import GeneratorError
from actvpipe.sampling import TokenBatch
from actvpipe.stream import ActivationLoader, ActivationStream, BufferedStream, from_hdf5, gpt2_stream, stream

__version__ = "0.1.0"

__all__ = [
    "ActivationLoader",
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
]
