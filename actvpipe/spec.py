"""Sources: the small picklable descriptions of what a generator process produces, and the options of
how a run produces it.

A source says what its rows *are*: ``StreamSpec`` a model over text, ``Hdf5Spec`` rows read back
from cache files. That identity alone drives the resume fingerprint and the cache files'
attributes. ``GeneratorOptions`` say how this run produces them (device, write-through file): they
never change a row, so a state saved under some options restores under others. Both sources follow
``RowSource``, so nothing downstream asks which kind it holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch

from actvpipe.capture import capture_points, describe_capture
from actvpipe.documents import DatasetSource
from actvpipe.fingerprint import files_digest
from actvpipe.hdf5 import Hdf5File, Hdf5Rows, decodable
from actvpipe.models import ModelSource, quiet_transformers
from actvpipe.numerics import reproducible_blas
from actvpipe.placement import DEFAULT_WATERMARKS
from actvpipe.text import PACKING_DESCRIPTIONS
from actvpipe.version import __version__

if TYPE_CHECKING:
    from actvpipe.generator_node import PlannedNode
    from actvpipe.records import RowBlock
    from actvpipe.resume import ResumePlan


@dataclass(frozen=True)
class GeneratorOptions:
    """How a generator produces its source's rows: never which rows, nor their values.

    ``device``: where the model runs ("cpu", "cuda[:N]", or "auto": between the GPU and the CPU on
    the buffer's fill, per ``watermarks``). ``write_hdf5``: the write-through cache file, written by
    the generator alone (see ``WriteThrough``); in-process jobs (``to_hdf5``, statistics) run with
    ``in_process()``, which never writes it.
    """

    device: str = "cpu"
    watermarks: tuple[float, float] = DEFAULT_WATERMARKS
    write_hdf5: str | None = None

    def in_process(self) -> GeneratorOptions:
        """The options of a pass run in the training process: same device, no write-through."""
        return dataclasses.replace(self, write_hdf5=None)


class RowSource(Protocol):
    """What the trainer and the generator need of a source, whatever produces its rows."""

    seed: int
    deterministic: bool

    @property
    def row_shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def from_disk(self) -> bool:
        """Rows read back from cache files rather than computed by a model."""
        ...

    def fingerprint(self) -> dict[str, object]: ...

    def require_live(self, what: str) -> None:
        """Raise ``TypeError`` naming ``what`` when the source cannot do what a live stream does."""
        ...

    def setup_process(self) -> None:
        """Prepare the generator process (threads, numerics) before the graph is built."""
        ...

    def rows_graph(
        self, plan: ResumePlan, options: GeneratorOptions, fill=None, report=None
    ) -> PlannedNode[RowBlock]:
        """The node graph producing the rows of ``plan``, built in the process that runs it."""
        ...


# Field metadata: ``file=False`` marks what the HDF5 files the stream writes do not record (it
# decides how the pass is cut or served, not what a row holds); ``restore=False`` what a saved state
# need not match (read from the model, not an option).
PASS_ONLY = {"file": False}


@dataclass(frozen=True)
class StreamSpec:
    """What a live stream's rows are, resolved and validated in the training process. Each option is
    declared once, here: the resume fingerprint and the cache files' attributes derive from it."""

    model: ModelSource | tuple[ModelSource, ...]  # a tuple: several models side by side in each row
    dataset: DatasetSource
    context_length: int
    layers: tuple[int, ...]
    capture: tuple[str, ...]
    modules: tuple[str, ...] | None
    d_model: int = field(metadata={"restore": False})  # read from the model, not an option
    generation_batch_size: int = field(metadata=PASS_ONLY)
    dtype: torch.dtype = field(metadata=PASS_ONLY)  # the buffer's; a file records its own
    seed: int = field(metadata=PASS_ONLY)
    exclude_bos: bool = True
    deterministic: bool = field(default=False, metadata=PASS_ONLY)
    model_dtype: torch.dtype | None = None  # None: the buffer's dtype
    exclude_tokens: tuple[int, ...] = ()
    packing: str = "concat"
    rank: int = field(default=0, metadata=PASS_ONLY)
    world_size: int = field(default=1, metadata=PASS_ONLY)

    @property
    def diffing(self) -> bool:
        """Several models side by side in each row (a models axis), even a list of one."""
        return isinstance(self.model, tuple)

    @property
    def sources(self) -> tuple[ModelSource, ...]:
        return self.model if self.diffing else (self.model,)

    @property
    def n_models(self) -> int:
        """Models side by side in each row; 1 (no models axis) for a single model."""
        return len(self.sources)

    @property
    def tokenizer(self):
        """The tokenizer every model reads (checked to be the same, or given once)."""
        return self.sources[0].tokenizer

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.model_dtype or self.dtype

    @property
    def first_pos(self) -> int:
        """First captured position of each context: 1 skips the BOS row."""
        return 1 if self.exclude_bos else 0

    @property
    def row_shape(self) -> tuple[int, ...]:
        models = (self.n_models,) if self.diffing else ()
        return (*models, len(self.capture), len(self.layers), self.d_model)

    @property
    def from_disk(self) -> bool:
        return False

    def require_live(self, what: str) -> None:
        return None

    def setup_process(self) -> None:
        """Every core for the forward; with ``deterministic``, bitwise reproducible GEMMs; no
        progress output from transformers."""
        quiet_transformers()
        torch.set_num_threads(os.cpu_count() or 1)
        if self.deterministic:
            reproducible_blas()

    def rows_graph(
        self, plan: ResumePlan, options: GeneratorOptions, fill=None, report=None
    ) -> PlannedNode[RowBlock]:
        """Load model and tokenizer (in the process that runs the pass) and build text -> rows per
        ``plan``; ``fill`` and ``report`` connect the device policy to the buffer (see ``Placement``)."""
        from actvpipe.pipeline import build_rows_graph

        return build_rows_graph(self, plan, options, fill, report)

    def options(self, purpose: str) -> dict[str, object]:
        """The options that matter for ``purpose`` ("restore" or "file"), as plain values."""
        out = {}
        for option in fields(self):
            if option.metadata.get(purpose, True):
                value = self.compute_dtype if option.name == "model_dtype" else getattr(self, option.name)
                out[option.name] = plain(value)
        return out

    def content(self) -> dict[str, object]:
        """What the model, the tokenizer and the data are (see ``models``, ``documents``)."""
        models = [s.content for s in self.sources] if self.diffing else self.model.content
        return {
            "model_content": models,
            "tokenizer_content": self.sources[0].tokenizer_content,
            "dataset_content": self.dataset.content,
        }

    def fingerprint(self) -> dict[str, object]:
        """The options a saved state must match to be restored, and the content of the model and the
        data (a state restored onto changed data or weights would regenerate other rows)."""
        return {**self.options("restore"), **self.content()}

    def file_attrs(self) -> dict[str, object]:
        """What a cache file records about how its rows were made: the options recorded in files,
        with capture points and packing spelled out."""
        tokenizer = self.tokenizer
        hashes = [s.config_hash for s in self.sources]
        several = {"n_models": self.n_models} if self.diffing else {}
        return {
            **{k: v for k, v in self.options("file").items() if v is not None},
            **several,
            "capture": describe_capture(self.capture),
            "packing": PACKING_DESCRIPTIONS[self.packing],
            "config_hash": hashes if several else hashes[0],
            "tokenizer": tokenizer if isinstance(tokenizer, str) else type(tokenizer).__name__,
            # a write-through file is continued, and read back on restore, only by the same weights and data
            "content_digest": hashlib.blake2b(
                json.dumps(self.content(), sort_keys=True, default=str).encode(), digest_size=16
            ).hexdigest(),
            "actvpipe_version": __version__,
        }


def plain(value: object) -> object:
    """An option as a value that pickles, compares and prints plainly (and fits an HDF5 attribute)."""
    if isinstance(value, (ModelSource, DatasetSource)):
        return value.describe()
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Hdf5Spec:
    """Rows read back from validated cache files, in file order, as one pass."""

    files: tuple[Hdf5File, ...]
    seed: int = 0
    deterministic: bool = False

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.files[0].row_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.files[0].dtype

    @property
    def d_model(self) -> int:
        return self.row_shape[-1]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.files[0].attrs["layers"])

    @property
    def capture(self) -> tuple[str, ...]:
        return tuple(capture_points(self.files[0].attrs["capture"]))

    @property
    def from_disk(self) -> bool:
        return True

    def require_live(self, what: str) -> None:
        raise TypeError(
            f"{what}: this stream already reads HDF5 files; build a live stream with actvpipe.stream(...) "
            "(or copy the files)"
        )

    def setup_process(self) -> None:
        """Register the plugin filters the files need (``hdf5plugin``) in the generator too."""
        for code in {code for f in self.files for code in f.plugin_filters}:
            decodable(code)

    def rows_graph(
        self, plan: ResumePlan, options: GeneratorOptions, fill=None, report=None
    ) -> PlannedNode[RowBlock]:
        return Hdf5Rows(self.files, plan.buffered, plan.frontier)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "files": [[f.path, f.rows] for f in self.files],
            "files_content": files_digest(f.path for f in self.files),
            "dtype": str(self.dtype),
            "seed": self.seed,
            "deterministic": self.deterministic,
        }
