"""Seekable readers of local jsonl, txt and parquet files, one rank's share of them.

A document's record number is its address in the files: ``file index << 40 | byte offset`` of its
line (jsonl, txt) or ``| row`` (parquet). Addresses grow in reading order, so a restore seeks
straight to a saved one instead of re-reading what came before. Rank ``r`` of ``W`` reads the lines
that start in the ``r``-th of ``W`` equal byte ranges of each text file, or every ``W``-th parquet
row group (every ``W``-th row when there are fewer row groups than ranks): the ranks' shares are
disjoint and together hold every document once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

FILE_SHIFT = 40  # a file holds up to 1 TiB (or 2**40 rows)
Block = tuple[list[tuple[int, Any]], int]  # ([(address, value)], the address after the block)


def address(file: int, position: int) -> int:
    return file << FILE_SHIFT | position


def split_address(record: int) -> tuple[int, int]:
    return record >> FILE_SHIFT, record & ((1 << FILE_SHIFT) - 1)


def line_blocks(
    files: tuple[str, ...],
    parse: Callable[[bytes, str, int], Any],
    block_docs: int,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Block]:
    """Blocks of ``block_docs`` parsed lines from address ``start`` on, within this rank's byte
    ranges; a line belongs to the range its first byte lies in."""
    first_file, first_position = split_address(start)
    for k in range(first_file, len(files)):
        path = files[k]
        size = os.path.getsize(path)
        low, high = size * rank // world_size, size * (rank + 1) // world_size
        begin = max(low, first_position) if k == first_file else low
        if begin >= high:
            continue
        with open(path, "rb") as f:
            position = _line_start(f, begin)
            block = []
            for line in f:
                if position >= high:
                    break
                block.append((address(k, position), parse(line, path, position)))
                position += len(line)
                if len(block) == block_docs:
                    yield block, address(k, position)
                    block = []
            if block:
                yield block, address(k, position)


def _line_start(f: Any, position: int) -> int:
    """Seek ``f`` to the first line that starts at or after ``position``; return where that is."""
    if position == 0:
        f.seek(0)
        return 0
    f.seek(position - 1)
    return position - 1 + len(f.readline())


def json_line(column: str) -> Callable[[bytes, str, int], Any]:
    """Parses one jsonl line to its ``column`` (None for a blank line or a record without it)."""

    def parse(line: bytes, path: str, position: int) -> Any:
        if not line.strip():
            return None
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(
                f"dataset: {path} at byte {position} is not a JSON object per line ({exc}); "
                "write one JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(
                f"dataset: {path} at byte {position} holds a JSON {type(record).__name__}, not an object; "
                "write one JSON object per line"
            )
        return record.get(column)

    return parse


def text_line(line: bytes, path: str, position: int) -> str:
    """One txt line, without its line break."""
    try:
        return line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"dataset: {path} at byte {position} is not UTF-8 ({exc}); re-encode the file as UTF-8"
        ) from None


def parquet_blocks(
    files: tuple[str, ...], column: str, block_docs: int, start: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[Block]:
    """Blocks of ``block_docs`` values of ``column`` from address ``start`` on, from this rank's row
    groups (or rows); each row group is read only when reached, one column only."""
    import pyarrow.parquet as pq

    groups = []  # (file, row group, its first row in the file, its rows)
    for k, path in enumerate(files):
        meta = pq.read_metadata(path)
        first = 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            groups.append((k, g, first, rows))
            first += rows
    by_group = len(groups) >= world_size
    total = 0  # rows before each group, over all files: the row-wise share counts them
    first_file, first_row = split_address(start)
    block: list[tuple[int, Any]] = []
    opened: tuple[int, Any] = (-1, None)
    for index, (k, g, first, rows) in enumerate(groups):
        row_base, total = total, total + rows
        if (by_group and index % world_size != rank) or (k, first + rows) <= (first_file, first_row):
            continue
        if opened[0] != k:
            opened = (k, pq.ParquetFile(files[k]))
        values = opened[1].read_row_group(g, columns=[column]).column(0).to_pylist()
        for j in range(max(0, first_row - first) if k == first_file else 0, rows):
            if by_group or (row_base + j) % world_size == rank:
                block.append((address(k, first + j), values[j]))
                if len(block) == block_docs:
                    yield block, address(k, first + j + 1)
                    block = []
    if block:
        yield block, address(len(files), 0)


def first_line_record(path: str) -> dict | None:
    """The first non-blank line of a jsonl file, parsed; None when the file is blank or not JSON lines."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    return None
                return record if isinstance(record, dict) else None
    return None


def parquet_columns(path: str) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)
