"""Where the text comes from: resolve a user's ``dataset`` argument and read its documents in blocks."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actvpipe.checks import pickle_for_generator
from actvpipe.file_readers import (
    first_line_record,
    json_line,
    line_blocks,
    parquet_blocks,
    parquet_columns,
    text_line,
)
from actvpipe.fingerprint import documents_digest, files_digest
from actvpipe.locations import cache_dir, partial_path, remove_dead_partials

BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}
NATIVE = ("jsonl", "text", "parquet")  # read by ``file_readers``: seekable, each rank reads its share
OFFLINE_HINT = (
    "Without network access pass a local json/jsonl/txt/parquet file or directory, a datasets.Dataset, "
    "a list of strings, or use actvpipe.demo_stream() (bundled corpus)"
)


@dataclass(frozen=True)
class DatasetSource:
    """A picklable description of the text source, opened again in the generator process."""

    kind: str  # "hub" | "files" | "object"
    value: Any  # hub id | (format, paths) | datasets.Dataset / IterableDataset / list of str
    text_column: str
    content: dict[str, str] | str = ""  # see ``fingerprint``; filled in by ``resolve_dataset``
    label: str = ""  # what the user passed, when ``value`` is a memory-mapped copy of it
    revision: str = ""  # the commit a hub dataset resolved to; the generator reads that commit

    @property
    def native(self) -> bool:
        """Local files that actvpipe's own readers read (``file_readers``)."""
        return self.kind == "files" and self.value[0] in NATIVE

    def describe(self) -> str:
        """The data, and its column unless it is ``text``."""
        column = "" if self.text_column == "text" else f" (column {self.text_column!r})"
        return (self.label or self._data()) + column

    def _data(self) -> str:
        if self.kind == "hub":
            return f"{self.value}@{self.revision}" if self.revision else str(self.value)
        if self.kind == "files":
            return ",".join(self.value[1])
        if isinstance(self.value, list):
            ends = hashlib.sha1(repr((self.value[:1], self.value[-1:])).encode()).hexdigest()[:12]
            return f"<list of {len(self.value)} documents {ends}>"
        return f"<{type(self.value).__name__} {getattr(self.value, '_fingerprint', '')}>"


def resolve_dataset(dataset: Any, text_column: str = "text") -> DatasetSource:
    """Check ``dataset`` before any work starts: it exists, is readable and has the text column."""
    loaded = sys.modules.get("datasets")  # imported lazily: only file and hub datasets need it
    if loaded is not None and isinstance(dataset, (loaded.Dataset, loaded.IterableDataset)):
        source = DatasetSource("object", dataset, text_column)
    elif isinstance(dataset, (str, os.PathLike)):
        source = _resolve_path_or_hub(os.fspath(dataset), text_column)
    elif isinstance(dataset, Iterable) and not isinstance(dataset, (bytes, dict)):
        if iter(dataset) is dataset:
            raise TypeError(
                "dataset: a one-shot iterator cannot be sent to the generator process; "
                "pass a list of strings, a datasets.Dataset or a file path instead"
            )
        source = DatasetSource("object", list(dataset), text_column)
    else:
        raise TypeError(
            f"dataset: expected a hub id, a path, a datasets.Dataset/IterableDataset or an iterable of "
            f"strings, got {type(dataset).__name__}"
        )
    column = _check_first_document(source)
    return _memory_mapped(dataclasses.replace(source, text_column=column, content=_content(source)))


SMALL_LIST_BYTES = 4 << 20  # a list of documents up to this size is sent to each generator as it is


def _memory_mapped(source: DatasetSource) -> DatasetSource:
    """In-memory data that would be costly to pickle into every generator (a ``datasets.Dataset``
    without cache files, a list of documents over 4 MiB), written once to Arrow files under the
    actvpipe cache and memory-mapped: a start then sends file references, whatever the size."""
    data = source.value
    if source.kind != "object" or (isinstance(data, list) and _list_bytes(data) <= SMALL_LIST_BYTES):
        return source
    import datasets

    if isinstance(data, datasets.IterableDataset):
        pickled = PickledData.of(data)
        content = source.content or Path(pickled.path).stem  # its pickle's hash, lacking a fingerprint
        return dataclasses.replace(source, value=pickled, label=source._data(), content=content)
    if isinstance(data, list):
        key, data = source.content, datasets.Dataset.from_dict({source.text_column: data})
    elif isinstance(data, datasets.Dataset) and not data.cache_files:
        key = data._fingerprint
    else:
        return source  # memory-mapped already
    target = cache_dir() / "datasets" / str(key)
    if not (target / "dataset_info.json").is_file():
        remove_dead_partials(target.parent)
        partial = partial_path(target)
        quiet = datasets.utils.are_progress_bars_disabled()
        datasets.utils.disable_progress_bars()  # put back below: the user's setting stays theirs
        try:
            data.save_to_disk(str(partial))
        finally:
            if not quiet:
                datasets.utils.enable_progress_bars()
        try:
            os.replace(partial, target)
        except OSError:  # another process wrote it first
            shutil.rmtree(partial, ignore_errors=True)
    mapped = datasets.load_from_disk(str(target))
    return dataclasses.replace(source, value=mapped, label=source._data())


@dataclass(frozen=True)
class PickledData:
    """An object (an ``IterableDataset`` and whatever it holds) pickled once to a file, so that a
    generator's start sends the file's name and the generator reads it back itself."""

    path: str

    @classmethod
    def of(cls, data: Any) -> PickledData:
        payload = pickle_for_generator(data, "dataset")
        path = cache_dir() / "datasets" / f"{hashlib.blake2b(payload, digest_size=12).hexdigest()}.pkl"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_dead_partials(path.parent)
            partial = partial_path(path)
            partial.write_bytes(payload)
            os.replace(partial, path)
        return cls(str(path))

    def load(self) -> Any:
        with open(self.path, "rb") as f:
            return pickle.load(f)


def _list_bytes(documents: list) -> int:
    """About how many bytes the documents take (bad entries are reported when read, not here)."""
    return sum(
        len(d) if isinstance(d, str) else 8 * len(d) if hasattr(d, "__len__") else 8 for d in documents
    )


def _content(source: DatasetSource) -> dict[str, str] | str:
    """What identifies the data: its files' digests, a hash of a list's documents, ``datasets``'
    own fingerprint of an in-memory dataset, or a hub dataset's id and the commit it resolved to."""
    if source.kind == "files":
        return files_digest(source.value[1])
    if isinstance(source.value, list):
        return documents_digest(source.value)
    if source.kind == "object":
        return str(getattr(source.value, "_fingerprint", "") or "")
    return source._data()


def _resolve_path_or_hub(name: str, text_column: str) -> DatasetSource:
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in BUILDERS and p.is_file())
        if not files:
            raise FileNotFoundError(
                f"dataset: directory {name!r} holds no {'/'.join(BUILDERS)} files; "
                "point to a directory of such files"
            )
    elif path.is_file():
        files = [str(path)]
    elif _looks_like_path(name):
        raise FileNotFoundError(f"dataset: no such file or directory {name!r}; check the path")
    else:
        return DatasetSource("hub", name, text_column, revision=_hub_dataset_revision(name))
    builders = {BUILDERS.get(Path(f).suffix) for f in files}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"dataset: {name!r} must be files of one kind among {', '.join(BUILDERS)}; "
            f"found suffixes {sorted({Path(f).suffix for f in files})}"
        )
    builder = builders.pop()
    if builder == "json" and first_line_record(files[0]) is not None:
        builder = "jsonl"  # JSON lines, whatever the suffix; other JSON goes through ``datasets``
    return DatasetSource("files", (builder, tuple(files)), text_column)


def _hub_dataset_revision(name: str) -> str:
    """The commit ``name`` resolves to on the hub now: the generator reads that commit, and a state
    saved on it is refused once the dataset has moved on."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(name).sha or ""
    except Exception as exc:
        raise ValueError(
            f"dataset: could not load {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"{OFFLINE_HINT}"
        ) from exc


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix in BUILDERS


def open_dataset(source: DatasetSource) -> Any:
    """The iterable of records (or strings) behind ``source``; loads hub and file datasets streaming."""
    if source.kind == "object":
        return source.value.load() if isinstance(source.value, PickledData) else source.value
    import datasets

    try:
        if source.kind == "hub":
            return datasets.load_dataset(
                source.value, split="train", streaming=True, revision=source.revision or None
            )
        builder, files = source.value
        builder = "json" if builder == "jsonl" else builder
        return datasets.load_dataset(builder, data_files=list(files), split="train", streaming=True)
    except Exception as exc:
        if source.kind == "hub":
            raise ValueError(
                f"dataset: could not load {source.value!r} from the Hugging Face hub ({type(exc).__name__}: "
                f"{exc}). {OFFLINE_HINT}"
            ) from exc
        raise ValueError(
            f"dataset: could not read {source.describe()} ({type(exc).__name__}: {exc})"
        ) from exc


def document_blocks(
    source: DatasetSource, block_docs: int, start: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[list[tuple[int, str]], int]]:
    """Yield ``([(record, text) of the non-empty documents], next record)`` from record ``start`` on,
    for rank ``rank`` of ``world_size`` (whose shares are disjoint and together hold every document).

    Records are addresses that grow in reading order: a list's or ``datasets.Dataset``'s index (rank
    ``r`` reads indices ``r`` mod ``world_size``), a position in local files (``file_readers``: a
    seek), or the index in this rank's split of a streamed dataset (``split_dataset_by_node``)."""
    if source.native:
        builder, files = source.value
        if builder == "parquet":
            blocks = parquet_blocks(files, source.text_column, block_docs, start, rank, world_size)
        else:
            parse = json_line(source.text_column) if builder == "jsonl" else text_line
            blocks = line_blocks(files, parse, block_docs, start, rank, world_size)
        for block, next_record in blocks:
            yield _texts([v for _, v in block], [r for r, _ in block], source), next_record
        return
    data = open_dataset(source)
    loaded = sys.modules.get("datasets")
    indexed = isinstance(data, list) or (loaded is not None and isinstance(data, loaded.Dataset))
    if indexed and not isinstance(data, list):
        data = data.select_columns([source.text_column])
    if indexed:
        first = start + (rank - start) % world_size  # the first index at or after start that is ours
        for i in range(first, len(data), block_docs * world_size):
            end = min(i + block_docs * world_size, len(data))
            values = data[i:end:world_size]
            values = values if isinstance(values, list) else values[source.text_column]
            yield _texts(values, range(i, end, world_size), source), end
        return
    if world_size > 1:
        from datasets.distributed import split_dataset_by_node

        data = split_dataset_by_node(data, rank=rank, world_size=world_size)
    if start:
        data = data.skip(start)
    record = start
    for batch in data.iter(batch_size=block_docs):
        if source.text_column not in batch:
            raise ValueError(_missing_column(source, list(batch)))
        values = batch[source.text_column]
        yield _texts(values, range(record, record + len(values)), source), record + len(values)
        record += len(values)


def _texts(values: list, records: Sequence[int], source: DatasetSource) -> list[tuple[int, str | np.ndarray]]:
    """Non-empty documents: text, or token ids for a pretokenized column."""
    out = []
    for record, value in zip(records, values, strict=True):
        if value is None or (isinstance(value, str | list | tuple | np.ndarray) and len(value) == 0):
            continue
        tokens = None if isinstance(value, str) else np.asarray(value)
        if tokens is not None and (tokens.ndim != 1 or tokens.dtype.kind not in "iu"):
            raise TypeError(
                f"dataset: column {source.text_column!r} of {source.describe()} holds "
                f"{type(value).__name__}, not text or token ids; pass text_column= naming a text column"
            )
        value = value if tokens is None else tokens
        out.append((record, value))
    return out


def _check_first_document(source: DatasetSource) -> str:
    """Raise if the dataset is empty or lacks the column; return the column to read (a default
    ``"text"`` missing from a pretokenized dataset becomes its ``input_ids`` or ``tokens``)."""
    if source.native:
        builder, files = source.value
        columns = ["text"] if builder == "text" else None
        if builder == "parquet":
            try:
                columns = parquet_columns(files[0])
            except Exception as exc:
                raise ValueError(
                    f"dataset: could not read {files[0]} ({type(exc).__name__}: {exc}); check its format"
                ) from exc
        elif builder == "jsonl":  # its first line parsed as an object when the format was chosen
            columns = list(first_line_record(files[0]) or {})
        return _column_in(source, columns)
    data = open_dataset(source)
    if isinstance(data, list):
        if not data:
            raise ValueError("dataset: the list of strings is empty; pass at least one document")
        _texts(data[:1], [0], source)
        return source.text_column
    columns = getattr(data, "column_names", None)
    if columns is None:
        try:
            first = next(iter(data))
        except StopIteration:
            raise ValueError(f"dataset: {source.describe()} is empty") from None
        except Exception as exc:
            raise ValueError(
                f"dataset: could not read {source.describe()} ({type(exc).__name__}: {exc}); "
                "check the file's format and encoding"
            ) from exc
        columns = list(first)
    return _column_in(source, columns)


def _column_in(source: DatasetSource, columns: list[str]) -> str:
    if source.text_column not in columns:
        token_columns = [c for c in TOKEN_COLUMNS if c in columns]
        if source.text_column == "text" and token_columns:
            return token_columns[0]
        raise ValueError(_missing_column(source, columns))
    return source.text_column


TOKEN_COLUMNS = ("input_ids", "tokens")


def _missing_column(source: DatasetSource, columns: list[str]) -> str:
    return (
        f"dataset: {source.describe()} has no column {source.text_column!r} (columns: {columns}); "
        "pass text_column= naming the column that holds the text"
    )
